"""The engine layer both jobs share, and the contract between the training loop and a job.

The loop of `lsts.train.trainer.train` knows a model only through two protocols: a `Job` (what to
train: checks, model, engine, hooks; `lsts.train.trainer.MASFormerJob` and
`lsts.finetune.trainer.FinetuneJob`) and the `Update` its ``build`` returns (forward and loss of
one row, backward, optimizer step). A job puts its model on the mesh with its own passes, wraps it
with `lsts.parallel.data_parallel.apply_data_parallel` over the blocks it names, and gets its
`Update` from `build_update`: `TorchUpdate` (AdamW and the schedule on the FSDP2, DDP or plain
module; lsts clips and guards) or `lsts.train.zero.ZeroUpdate` (a DeepSpeed ZeRO engine, which
backpropagates, clips and steps itself). `check_engine` is the engine's part of a job's check,
every rank, before any collective.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from lsts.config import Config
from lsts.parallel.data_parallel import check_supported
from lsts.parallel.dims import ParallelDims
from lsts.parallel.pipeline import PipelineRunner
from lsts.train import zero

# loss_fn(model, tokens, positions, ctx, labels) -> the summed loss of one row
LossFn = Callable[..., torch.Tensor]


@runtime_checkable
class Update(Protocol):
    """One optimizer step's worth of work, as the loop drives it."""

    # The pipeline schedule that runs forward and backward of whole batches (pp > 1; the loop then
    # sets ``loss_scale`` before each batch and never calls ``loss`` / ``backward``), or None.
    runner: PipelineRunner | None
    # (model, optimizer, scheduler) for the `Checkpointer`; (None, None, None) when the engine saves
    # them itself as the checkpointer's ``engine_state``.
    checkpoint_parts: tuple
    # The learning-rate schedule; the loop rebases it on resume and logs its last rate.
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def loss(self, tokens, positions, ctx, labels) -> torch.Tensor:
        """Forward of one row ``[1, S_local]`` under its `AttentionContext`: the summed loss over
        its labelled tokens (not yet scaled)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one row's loss, already scaled by the loop; gradients accumulate until `step`."""
        ...

    def step(self) -> tuple[float, float, bool]:
        """Clip and update: ``(global gradient norm, learning rate used, applied)``. A non-finite
        gradient is not applied (no optimizer or scheduler step) and returns ``applied`` False."""
        ...


@runtime_checkable
class Job(Protocol):
    """What the loop trains."""

    vocab_size: int  # the data pipeline's token ids stay below it
    save_frozen: bool  # whether checkpoints hold the frozen parameters too
    checkpoint_extra: dict  # recorded in every checkpoint's marker, read back by ``check_resume``

    def check(self, dims: ParallelDims, world: int) -> None:
        """Raise ValueError for anything about the configuration, the world and the model that
        cannot run; every rank, before any collective (so no rank hangs)."""
        ...

    def build(self, dims: ParallelDims, mesh, device: torch.device, dtype: torch.dtype) -> tuple[Update, float]:
        """The model on the mesh with its engine: ``(update, flops per token)``."""
        ...

    def check_resume(self, extra: dict) -> None:
        """Raise ValueError when a checkpoint's ``checkpoint_extra`` does not fit this run."""
        ...

    def before_step(self, step: int) -> None:
        """Whatever changes with the step (also after a resume), before its first forward."""
        ...

    def finish(self, update: Update) -> None:
        """After the last step, every rank (e.g. export the trained model)."""
        ...


def check_engine(cfg: Config, dims: ParallelDims) -> None:
    """The data-parallel engine's checks (what it can run with these dimensions; DeepSpeed's needs)."""
    check_supported(dims, cfg.parallel.dp_engine)
    if cfg.parallel.dp_engine in zero.ZERO_STAGES:
        zero.check_config(cfg)


def lr_lambda(cfg: Config):
    """The LambdaLR factor of ``optim.schedule``: linear warm-up, then constant, linear or cosine
    decay to ``optim.min_lr`` at ``train.steps``."""
    o, steps = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        decay = 1 - progress if o.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return (o.min_lr + (o.lr - o.min_lr) * decay) / o.lr

    return factor


def build_update(
    cfg: Config, model: torch.nn.Module, dims: ParallelDims, device, dtype: torch.dtype, loss_fn: LossFn
) -> Update:
    """The optimizer step of the configured engine around ``model`` (as `apply_data_parallel` returned
    it): a DeepSpeed `ZeroUpdate`, or a `TorchUpdate` (a model alone on its ``dp_cp`` group, which no
    engine casts, computes in ``dtype``)."""
    if cfg.parallel.dp_engine in zero.ZERO_STAGES:
        return zero.ZeroUpdate(
            model,
            cfg,
            device,
            dtype,
            loss_fn=loss_fn,
            schedule=lr_lambda(cfg),
            backward_calls=cfg.train.grad_accum * cfg.data.batch_size,
            dp_cp_size=dims.dp * dims.cp,
        )
    if dims.dp * dims.cp == 1 and dtype != torch.float32:
        model = model.to(dtype)
    return TorchUpdate(model, cfg, loss_fn)


class TorchUpdate:
    """AdamW and the LambdaLR schedule on the FSDP2-, DDP-wrapped or plain module; the gradient is
    clipped and checked here, before the optimizer steps."""

    def __init__(self, model: torch.nn.Module, cfg: Config, loss_fn: LossFn) -> None:
        o = cfg.optim
        self.model, self.grad_clip = model, o.grad_clip
        trainable = [p for p in model.parameters() if p.requires_grad]  # frozen weights (LoRA) get no state
        self.optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.loss = functools.partial(loss_fn, model)
        self.checkpoint_parts = (model, self.optimizer, self.scheduler)  # what the Checkpointer saves
        self.runner: PipelineRunner | None = None  # pp > 1: the schedule runs forward and backward
        self.pp_group = None
        self.loss_scale = 1.0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float, bool]:
        """Clip and update: ``(gradient norm, learning rate used, applied)``; a non-finite gradient
        norm is not applied."""
        grad_norm = _clip(self.model, self.grad_clip, self.pp_group)
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(grad_norm):
            return grad_norm, lr, False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, lr, True


def _clip(model, max_norm: float, pp_group=None) -> float:
    """Global gradient norm over every parameter — plain, FSDP-sharded or tensor-parallel DTensor
    alike (a DTensor's norm is reduced over its mesh), summed over the pipeline stages — then clip
    in place to ``max_norm``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    squares = []
    for g in grads:
        n = torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32))  # float64 stays
        squares.append((n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    norm = total.sqrt()
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return float(norm)


__all__ = ["Job", "LossFn", "TorchUpdate", "Update", "build_update", "check_engine", "lr_lambda"]
