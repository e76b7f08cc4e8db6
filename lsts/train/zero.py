"""DeepSpeed ZeRO stages 1-3 as the data-parallel engine (``parallel.dp_engine = zero1 | zero2 | zero3``).

`ZeroUpdate` builds one ``deepspeed.initialize`` engine around the model and its loss, with a
DeepSpeed config derived from lsts' `Config`: AdamW from ``optim.*``, the trainer's LambdaLR
schedule (`lsts.train.engine.lr_lambda`), ``gradient_clipping = optim.grad_clip``, bf16 when the
run's dtype is bf16, one row per micro-batch and as many accumulation steps as the trainer makes
backward calls per optimizer step (``train.grad_accum × data.batch_size``). It is an
`lsts.train.engine.Update` like the plain PyTorch path (built by `lsts.train.engine.build_update`)
and the checkpointer's `EngineState`. Sources: DeepSpeed's engine (``runtime/engine.py``) and ZeRO
optimizers (``runtime/zero/stage_1_and_2.py``, ``stage3.py``), read for version 0.19.

Semantics kept exactly:

- DeepSpeed's data-parallel group is the world, which is ``mesh["dp_cp"]`` (every rank holding the
  same weights) because tensor and pipeline parallelism are refused with ZeRO. It averages
  gradients over that group as FSDP2 and DDP do, so the trainer's `gradient_scale` applies
  unchanged; ``backward(scale_wrt_gas=False)`` stops DeepSpeed from also dividing by the number of
  accumulation steps, because the trainer already divides by the step's global token count.
- The loss head (``linear_cross_entropy`` on ``output_weight``) runs inside the engine's forward:
  ZeRO-3 gathers a partitioned weight only while a module of the engine is running, and the output
  projection (the tied embedding) is read by the loss, outside ``MASFormer.forward``.
- Gradient norm and clipping: DeepSpeed computes the global norm of the reduced gradient partitions
  before the update, as `lsts.train.trainer` does over whole gradients, and clips by
  ``clip / (norm + 1e-6)``; the two differ only for a norm within 1e-6 *below* the threshold, which
  DeepSpeed already scales by that (nearly 1) factor and lsts leaves alone.
- Non-finite guard: the trainer checks the loss before the last ``engine.step()`` of a step, so a
  non-finite loss never updates anything. A non-finite gradient is caught by DeepSpeed itself: its
  ZeRO optimizers take the global norm of the reduced gradient partitions before updating and, when
  it is inf or NaN (as any non-finite element makes it), skip the update: no AdamW step, no scheduler
  step, gradients dropped. `step` reports that as not applied and the trainer raises, so "the
  optimizer did not step" holds as for FSDP2 and DDP (a test injects a NaN gradient into each
  stage). Limits: it relies on DeepSpeed computing the norm, which it does unless
  ``zero_optimization.compute_grad_norm`` is turned off (lsts never does); the gradient is checked
  only after its reduction across ranks, so the communication of a poisoned step is spent.

Not exact: in bf16, DeepSpeed keeps gradient partitions in bf16 (the reduction itself is asked for
in fp32) where FSDP2 keeps fp32 gradient shards, so bf16 runs of the two engines agree only to bf16
rounding (about 3e-4 relative on the tests' tiny model). In fp32 the engines agree to summation order.

Checkpoints go through ``engine.save_checkpoint`` / ``load_checkpoint`` into ``<step dir>/deepspeed``
of the `Checkpointer`'s atomic step directory (which also holds the data loader and RNG states).
They do not reshard: a resume on another world size is refused, naming DeepSpeed's
universal-checkpoint conversion, which lsts does not load yet.

Limits: tp = pp = 1 (refused otherwise, in `lsts.parallel.data_parallel.check_supported`); float16 is
refused (DeepSpeed's fp16 path is built around dynamic loss scaling, which lsts does not do); no
optimizer or parameter offload.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from lsts.config import Config
from lsts.train.checkpoint import CheckpointInfo

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
SUBDIR = "deepspeed"  # inside a checkpoint's step directory
_TAG = "zero"  # DeepSpeed's checkpoint tag: <step dir>/deepspeed/zero/


def check_config(cfg: Config) -> None:
    """What the ZeRO engine cannot run, as a ValueError before any collective."""
    engine = cfg.parallel.dp_engine
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"parallel.dp_engine={engine} needs DeepSpeed: pip install deepspeed")
    if cfg.train.dtype == "float16":
        raise ValueError(
            f"train.dtype=float16 with parallel.dp_engine={engine}: DeepSpeed's fp16 path relies on dynamic "
            "loss scaling, which lsts does not do; use bfloat16 (or float32)"
        )


def deepspeed_config(cfg: Config, dtype: torch.dtype, backward_calls: int) -> dict:
    """The DeepSpeed config of a run. One row per backward call, so the accumulation steps are the
    backward calls of one optimizer step; DeepSpeed multiplies in its data-parallel world itself."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": backward_calls,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": ZERO_STAGES[cfg.parallel.dp_engine]},
        "bf16": {"enabled": dtype == torch.bfloat16},
        # Reduce gradients in fp32 whatever the parameter dtype, as lsts' FSDP2 policy does.
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,  # lsts logs the metrics; DeepSpeed's progress lines would repeat them
        "wall_clock_breakdown": False,
    }


class _WithLoss(torch.nn.Module):
    """The model and its loss as one module, so that DeepSpeed's forward covers every use of a
    parameter (see the module docstring). ``forward(tokens, positions, ctx, labels) -> summed loss``."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, tokens, positions, ctx, labels) -> torch.Tensor:
        return self.loss_fn(self.model, tokens, positions, ctx, labels)


class ZeroUpdate:
    """The DeepSpeed engine behind the trainer's step: ``loss`` / ``backward`` per row, ``step`` per
    optimizer step. Also the checkpointer's `EngineState` (``name``, ``save``, ``load``).

    ``loss_fn(model, tokens, positions, ctx, labels)`` is the trainer's summed row loss;
    ``schedule`` its LambdaLR factor; ``backward_calls`` the rows of one optimizer step on a rank.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        device: torch.device,
        dtype: torch.dtype,
        loss_fn: Callable,
        schedule: Callable[[int], float],
        backward_calls: int,
        dp_cp_size: int,
    ) -> None:
        # DeepSpeed reduces over its own data-parallel group, the world: right only while nothing
        # else (tp, pp) splits the ranks, which check_supported guarantees.
        if dp_cp_size != dist.get_world_size():
            world = dist.get_world_size()
            raise RuntimeError(f"ZeRO's data-parallel group must be the world of {world}, not {dp_cp_size}")
        import deepspeed  # here, not at the top: an optional dependency and a slow import

        # DeepSpeed insists on reading the local rank from the environment. torchrun sets it; a plain
        # one-process run or an existing process group (tests) does not: give it lsts' device.
        os.environ.setdefault("LOCAL_RANK", str(device.index or 0))

        # Its INFO lines at start-up (config dumps, optimizer choices) would drown lsts' own output.
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        o = cfg.optim
        self.engine, *_ = deepspeed.initialize(
            model=_WithLoss(model, loss_fn),
            optimizer=lambda params: torch.optim.AdamW(
                params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
            ),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
            config=deepspeed_config(cfg, dtype, backward_calls),
        )
        self.name = f"deepspeed-{cfg.parallel.dp_engine}"
        self.checkpoint_parts = (None, None, None)  # the engine saves model, optimizer and scheduler itself
        self.backward_calls = backward_calls
        self._calls = 0
        self.runner = None  # ZeRO runs without pipeline stages (see check_supported)

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return self.engine.lr_scheduler

    def loss(self, tokens, positions, ctx, labels) -> torch.Tensor:
        return self.engine(tokens, positions, ctx, labels)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one row (the trainer has scaled ``loss``: no 1/accumulation-steps here). Every
        row but the last of a step is followed by the engine's micro-step, which only counts it; the
        last one's step is `step`, after the trainer has checked the loss."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self._calls += 1
        if self._calls < self.backward_calls:
            self.engine.step()

    def step(self) -> tuple[float, float, bool]:
        """Reduce (ZeRO-1), clip and update: ``(gradient norm, learning rate used, applied)``.
        Not applied means DeepSpeed found the gradient non-finite and skipped the update."""
        # A different count would move DeepSpeed's accumulation boundary off the optimizer step.
        if self._calls != self.backward_calls or not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"ZeRO step after {self._calls} backward calls, expected {self.backward_calls} at DeepSpeed's "
                f"accumulation boundary"
            )
        self._calls = 0
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm if norm is not None else "nan"), lr, self.engine.was_step_applied()

    # ---- EngineState (lsts.train.checkpoint) ------------------------------------------------

    def save(self, directory: Path) -> None:
        # `latest` inside our own step directory lets DeepSpeed's tools (zero_to_fp32.py,
        # ds_to_universal) find the tag; it is written before lsts' atomic rename like the rest.
        self.engine.save_checkpoint(str(directory / SUBDIR), tag=_TAG, save_latest=True)

    def load(self, directory: Path, info: CheckpointInfo) -> None:
        world = dist.get_world_size()
        if info.world_size != world:
            raise ValueError(
                f"checkpoint {directory} holds DeepSpeed ZeRO partitions for {info.world_size} ranks, this run has "
                f"{world}: ZeRO checkpoints do not reshard here. Resume on {info.world_size} ranks, or convert it "
                "with DeepSpeed's universal-checkpoint tool (python -m deepspeed.checkpoint.ds_to_universal "
                f"--input_folder {directory / SUBDIR / _TAG} --output_folder ...), which lsts cannot load yet"
            )
        path, _ = self.engine.load_checkpoint(str(directory / SUBDIR), tag=_TAG)
        if path is None:
            raise ValueError(f"checkpoint {directory} has no DeepSpeed state under {SUBDIR}/{_TAG}")


__all__ = ["ZERO_STAGES", "ZeroUpdate", "check_config", "deepspeed_config"]
