"""The data-parallel engines over a model's blocks, whatever the model: FSDP2 or DDP, and the checks
of what they can run.

FSDP2 (``fully_shard`` per block the caller names, then the root) runs over the data-parallel *and*
context-parallel ranks, which hold the same weights; DDP over the same ranks. Both average gradients
over those ranks, which the trainer compensates for by scaling the loss (`gradient_scale`), so the
gradient is that of the token-weighted mean loss whatever the engine. DeepSpeed ZeRO 1-3 average
over the same ranks, but its engine owns the optimizer as well, so `apply_data_parallel` leaves the
model unwrapped for it and `lsts.train.zero` builds the engine; it runs only without tensor and
pipeline parallelism, where those ranks are the whole world.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from lsts.parallel.dims import ParallelDims, ParallelMesh

SUPPORTED_ENGINES = ("fsdp2", "ddp", "zero1", "zero2", "zero3")


def check_supported(dims: ParallelDims, dp_engine: str) -> None:
    """What the engines can run today; a clear error for the rest (before any collective)."""
    if dims.tp > 1 and dp_engine == "ddp" and dims.dp * dims.cp > 1:
        raise ValueError(
            "parallel.tp > 1 with parallel.dp_engine=ddp: DDP does not take the tensor-parallel (DTensor) "
            "parameters; use dp_engine=fsdp2"
        )
    if dp_engine.startswith("zero") and (dims.tp > 1 or dims.pp > 1):
        raise ValueError(
            f"parallel.tp = {dims.tp}, parallel.pp = {dims.pp} with parallel.dp_engine={dp_engine}: lsts runs "
            "DeepSpeed ZeRO over data- and context-parallel ranks only; set tp=1 and pp=1, or use dp_engine=fsdp2 "
            "for tensor parallelism"
        )
    if dp_engine not in SUPPORTED_ENGINES:
        raise ValueError(
            f"parallel.dp_engine = {dp_engine!r} is not implemented yet; choose one of {SUPPORTED_ENGINES}"
        )


def gradient_scale(dims: ParallelDims) -> int:
    """The engines average gradients over the ``dp_cp`` ranks; the loss is scaled up by as much."""
    return dims.dp * dims.cp


def apply_data_parallel(
    model: torch.nn.Module,
    blocks: Iterable[torch.nn.Module],
    dims: ParallelDims,
    mesh: ParallelMesh | None,
    dp_engine: str,
    param_dtype: torch.dtype,
) -> torch.nn.Module:
    """Wrap ``model`` in the configured engine over the ``dp_cp`` ranks and return the module to
    train: FSDP2 shards each of ``blocks`` (the units gathered one at a time; submodules of
    ``model``) and then the root, in place, computing in ``param_dtype`` and reducing in float32; DDP
    wraps the whole model. With one ``dp_cp`` rank or a ZeRO engine (`lsts.train.zero` wraps later)
    the model comes back as it is."""
    if dims.dp * dims.cp == 1 or dp_engine.startswith("zero"):
        return model
    if dp_engine == "fsdp2":
        shard_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in list(blocks):
            fully_shard(block, mesh=shard_mesh, mp_policy=policy)
        fully_shard(model, mesh=shard_mesh, mp_policy=policy)
        return model
    return DistributedDataParallel(model, process_group=mesh["dp_cp"].get_group())


__all__ = ["SUPPORTED_ENGINES", "apply_data_parallel", "check_supported", "gradient_scale"]
