"""A training run's per-rank peak memory, FLOPs, communication and roofline step time, before it
runs; and the layouts of a world that fit a device, fastest first, with the longest sequence each
admits.

Memory per rank = the traced step (`lsts.planner.trace`: activations by layer and memory pass,
the loss chunk, the sequence-parallel buffers, all as the real code allocates them) + what the
data-parallel engine holds, by formula from the traced parameter counts (``P`` of this rank's
model, ``B`` of its largest block, ``R`` outside the blocks; ``n = dp_shard × cp`` FSDP shards;
``b`` bytes of the compute dtype):

- FSDP2 (the trainer's default when ``dp × cp > 1``): fp32 parameters, gradients and AdamW's two
  moments sharded, ``16 P / n``; the all-gathered parameters of the root (``R b``, kept from forward
  to backward) and of two blocks (the running one and the prefetched one, ``2 B b``), and one block's
  unsharded gradient in the compute dtype and in fp32 for the reduce-scatter (``B (b + 4)``).
- DDP: fp32 parameters, gradients, their bucket copy and two moments, ``20 P``; activations in fp32
  (the trainer does not cast a DDP model).
- One rank: everything in the compute dtype, as traced.

With ``activation_offload`` on a GPU, what each checkpointed block keeps for its backward (its
input, traced per block) waits in host memory: it leaves the device's figure and is reported as
``host_offload_bytes``. On CPU the copy stays in the same memory, so it counts.

Pipeline parallelism (1F1B): the busiest stage is traced; its activations are held for
``min(pp, micro-batches)`` micro-batches. On CPU (no ``--gpu``) the figure is the process's peak
resident set, as the trainer logs it: the measured start-up (`lsts.planner.baseline`) plus the
tensors, or the start-up's own peak when that is higher.

Communication bytes a rank sends per step: ring, halo and Ulysses as traced (recomputation
included); FSDP ``(n-1)/n`` of the parameters gathered in forward and again in backward (in ``b``
bytes) and of the gradients reduce-scattered (fp32); DDP ``2 (n-1)/n`` of the fp32 gradients;
tensor parallelism two all-reduces of ``[tokens, dim]`` per block forward and two backward
(``2 (tp-1)/tp`` each; one more forward per recomputation); the pipeline one ``[tokens, dim]``
activation per micro-batch forward and its gradient backward.

FLOPs: ``step_flops`` is the model's (`MASFormer.flops_per_token` × tokens, as the trainer's MFU
counts them, all ranks); the roofline charges each rank its share plus the recomputation of
checkpointed blocks (one more forward, a third of the model FLOPs) and of feed-forward tiles, at
the device's dense peak, against the communication at its link bandwidth, and takes the larger
(they overlap): a lower bound of the step time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lsts.config import Config
from lsts.parallel.dims import ParallelDims
from lsts.planner.trace import StepTrace, documents_for, trace_step
from lsts.train.metrics import peak_flops_by_name

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Device:
    """An accelerator as the roofline sees it."""

    name: str  # as CUDA reports it (the trainer's MFU table is keyed by it)
    memory_gib: float
    link_gb_s: float  # one direction, per GPU (NVLink)
    usable: float = 0.9  # the share of memory a run may plan for: the allocator's fragmentation takes the rest

    def peak_flops(self, dtype: torch.dtype) -> float:
        # TF32 runs at half the dense 16-bit rate on A100 and H100.
        return peak_flops_by_name(self.name, torch.bfloat16) / (1 if dtype != torch.float32 else 2)


DEVICES = {
    "h100-80gb": Device("NVIDIA H100 80GB HBM3", 79.6, 450),
    "h200-141gb": Device("NVIDIA H200", 139.8, 450),
    "a100-80gb": Device("NVIDIA A100-SXM4-80GB", 79.2, 300),
    "a100-40gb": Device("NVIDIA A100-SXM4-40GB", 39.4, 300),
}


@dataclass
class Prediction:
    """One rank's step (rank 0; on a pipeline, its busiest stage)."""

    layout: dict
    memory: dict  # bytes by kind at the peak (on CPU with the process's resident start-up)
    peak_bytes: int  # their sum; on CPU at least the start-up's own peak
    layers: dict  # activations each block keeps for backward, bytes
    comm_bytes: dict  # sent per step by this rank, by transport
    step_flops: float  # model FLOPs of the whole step, all ranks
    rank_flops: float  # this rank's, with recomputation
    step_time_s: dict | None  # roofline on the named device; None on CPU
    device: str
    host_offload_bytes: int = 0  # checkpointed block inputs waiting in host memory (GPU with offload)
    # The most bytes of sequence-parallel receive buffers (ring K/V and dK/dV in flight, all-to-all
    # outputs) alive at once: part of "activations" and "temporaries", shown on their own.
    comm_buffers_in_activations: int = 0

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def to_json(self) -> dict:
        out = asdict(self)
        out["peak_gib_per_rank"] = self.peak_gib
        return out


def compute_dtype(cfg: Config, gpu: bool) -> torch.dtype:
    """The trainer's dtype (`lsts.train.trainer.resolve_device`) on a GPU or this CPU."""
    return DTYPES.get(cfg.train.dtype) or (torch.bfloat16 if gpu else torch.float32)


def _engine_memory(cfg: Config, dims: ParallelDims, t: StepTrace, b: int) -> dict:
    """Parameters, gradients, optimizer state and engine buffers of this rank (see the module)."""
    engine = cfg.parallel.dp_engine
    if dims.dp * dims.cp == 1:
        return {"params": t.params, "grads": t.grads, "optimizer": t.optimizer, "engine_buffers": 0}
    if engine == "fsdp2":
        n = dims.dp_shard * dims.cp
        shard = 4 * t.local_params // n
        buffers = (t.root_params + 2 * t.block_params) * b + t.block_params * (b + 4)
        return {"params": shard, "grads": shard, "optimizer": 2 * shard, "engine_buffers": buffers}
    if engine == "ddp":
        full = 4 * t.local_params
        return {"params": full, "grads": full, "optimizer": 2 * full, "engine_buffers": full}
    raise ValueError(
        f"the planner models parallel.dp_engine fsdp2 and ddp, not {engine!r}; plan with --parallel.dp_engine=fsdp2"
    )


def _activation_dtype(cfg: Config, dims: ParallelDims, dtype: torch.dtype) -> torch.dtype:
    """DDP trains the fp32 module as it is; FSDP2 computes in the dtype, as does one rank."""
    return torch.float32 if cfg.parallel.dp_engine == "ddp" and dims.dp * dims.cp > 1 else dtype


def _in_flight(cfg: Config, dims: ParallelDims) -> int:
    return min(dims.pp, cfg.parallel.pp_microbatches) if dims.pp > 1 else 1


def _comm_bytes(cfg: Config, dims: ParallelDims, t: StepTrace, b: int) -> dict:
    m, p = cfg.model, cfg.parallel
    out = {k: v * cfg.data.batch_size * cfg.train.grad_accum for k, v in t.sent.items()}
    rows = cfg.data.batch_size * cfg.train.grad_accum
    n = dims.dp_shard * dims.cp
    if dims.dp * dims.cp > 1 and p.dp_engine == "fsdp2":
        gather = 2 if p.activation_checkpoint == "none" else 3  # a checkpointed block is gathered for its recompute
        out["fsdp"] = (n - 1) * t.local_params * (gather * b + 4) // n
    elif dims.dp * dims.cp > 1 and p.dp_engine == "ddp":
        out["ddp"] = 2 * (dims.dp * dims.cp - 1) * t.local_params * 4 // (dims.dp * dims.cp)
    tokens = cfg.data.seq_len // dims.cp
    if dims.tp > 1:
        forwards = 1 + (p.activation_checkpoint != "none")
        per_reduce = 2 * (dims.tp - 1) * tokens * m.dim * b // dims.tp
        out["tp"] = len(t.layers) * 2 * (forwards + 1) * per_reduce * rows
    if dims.pp > 1:
        out["pp"] = 2 * tokens * m.dim * b * rows
    return out


def _flops(cfg: Config, dims: ParallelDims) -> tuple[float, float]:
    """``(model FLOPs of the step, this rank's FLOPs with recomputation)``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lsts.models.masformer import MASFormer

    with FakeTensorMode():
        per_token = MASFormer(cfg.model, cfg.kernels).flops_per_token(cfg.data.seq_len)
    tokens = cfg.data.seq_len * cfg.data.batch_size * cfg.train.grad_accum * dims.dp
    step = per_token * tokens
    p, m = cfg.parallel, cfg.model
    recompute = {"none": 0.0, "full": 1.0, "selective": 0.5}[p.activation_checkpoint] / 3
    if p.mlp_tile_tokens:
        mlp_share = 3 * m.dim * m.ffn_hidden * m.n_layers * 6 / per_token  # 6 FLOPs per weight, of all
        recompute += mlp_share / 3
    return step, step * (1 + recompute) / dims.world_size


def predict(cfg: Config, nproc: int, gpu: str | None = None, baseline: dict | None = None) -> Prediction:
    """The prediction for ``cfg`` on ``nproc`` ranks of ``gpu`` (a `DEVICES` key), or of this CPU.
    ``baseline``: the CPU start-up (`lsts.planner.baseline.measure`), measured when not given."""
    if gpu is not None and gpu not in DEVICES:
        raise ValueError(f"unknown --gpu {gpu!r}; choose one of {sorted(DEVICES)}")
    dims = ParallelDims.from_config(cfg.parallel, nproc)
    check_world(cfg, dims, nproc)
    dtype = compute_dtype(cfg, gpu is not None)
    b = torch.empty((), dtype=dtype).element_size()
    docs = documents_for(cfg)
    stages = sorted({0, dims.pp - 1})
    engine = dims.dp * dims.cp > 1  # its gradients and optimizer state are a formula: not traced
    act_dtype = _activation_dtype(cfg, dims, dtype)
    traces = [trace_step(cfg, dims, act_dtype, stage, docs, keep_grads=not engine) for stage in stages]
    in_flight = _in_flight(cfg, dims)
    t = max(traces, key=lambda tr: tr.activations * in_flight + tr.temporaries + tr.params)
    activations = t.activations * in_flight
    offloaded = sum(t.layers.values()) * in_flight if gpu is not None and cfg.parallel.activation_offload else 0
    memory = {
        **_engine_memory(cfg, dims, t, b),
        "activations": activations - offloaded,
        "temporaries": t.temporaries,
        "loss_chunk": t.loss_chunk,
    }
    step_flops, rank_flops = _flops(cfg, dims)
    comm = _comm_bytes(cfg, dims, t, b)
    if gpu is None:
        base = baseline if baseline is not None else measure_baseline(cfg, dims)
        memory["process_start"] = base["rss"]
        start_peak, time_s, device = base["peak"], None, "cpu"
    else:
        dev = DEVICES[gpu]
        compute_s = rank_flops / dev.peak_flops(dtype)
        comm_s = sum(comm.values()) / (dev.link_gb_s * 1e9)
        time_s, device = {"compute": compute_s, "comm": comm_s, "step": max(compute_s, comm_s)}, gpu
        start_peak = 0
    layout = {**dims.to_dict(), **_memory_modes(cfg), "seq_len": cfg.data.seq_len}
    peak = max(sum(memory.values()), start_peak)
    return Prediction(layout, memory, peak, t.layers, comm, step_flops, rank_flops, time_s, device,
                      offloaded, t.receive_buffers)  # fmt: skip


def _memory_modes(cfg: Config) -> dict:
    p = cfg.parallel
    return {
        "activation_checkpoint": p.activation_checkpoint,
        "activation_offload": p.activation_offload,
        "mlp_tile_tokens": p.mlp_tile_tokens,
        "loss_chunk_size": cfg.kernels.loss_chunk_size,
    }


def check_world(cfg: Config, dims: ParallelDims, nproc: int) -> None:
    """The trainer's own checks of the world, model and sequence (`lsts.train.trainer.check_run`)."""
    from lsts.train.trainer import check_run

    cfg.validate(nproc)
    check_run(cfg, dims, nproc)


def measure_baseline(cfg: Config, dims: ParallelDims) -> dict:
    from lsts.planner import baseline

    spec = {
        "data": asdict(cfg.data),
        "dp": dims.dp,
        "cp": dims.cp,
        "layout": cfg.parallel.layout,
        "vocab_size": cfg.model.vocab_size,
        "tensorboard": cfg.metrics.tensorboard,
    }
    return baseline.measure(spec)


__all__ = ["DEVICES", "Device", "Prediction", "check_world", "compute_dtype", "measure_baseline", "predict"]
