"""The parallelize pass: a model that knows nothing of parallelism in, a distributed one out.

Order (as in torchtitan): tensor parallelism (`apply_tensor_parallel`), activation checkpointing,
then the data-parallel engine. Context parallelism needs no change to the modules: the model's
attention calls receive an `AttentionContext` (see `lsts.attention.AttentionContext.from_mesh`) that shards
the sequence.

Data-parallel engines: FSDP2 (``fully_shard`` per transformer block, then the root) over the
data-parallel *and* context-parallel ranks, which hold the same weights; or DDP over the same ranks.
Both average gradients over those ranks, which the trainer compensates for by scaling the loss
(`gradient_scale`), so the gradient is that of the token-weighted mean loss whatever the engine.
DeepSpeed ZeRO 1-3 average over the same ranks, but its engine owns the optimizer as well, so this
pass leaves the model unwrapped for it and `lsts.train.zero` builds the engine; it runs only
without tensor and pipeline parallelism, where those ranks are the whole world.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

from lsts.parallel.dims import ParallelDims, ParallelMesh
from lsts.parallel.memory import checkpoint_block, tile_tokens

SUPPORTED_ENGINES = ("fsdp2", "ddp", "zero1", "zero2", "zero3")


def check_supported(dims: ParallelDims, dp_engine: str) -> None:
    """What this pass can build today; a clear error for the rest (before any collective)."""
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


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh) -> None:
    """Megatron-style tensor parallelism on every block: q/k/v and the SwiGLU input projections
    split by output features (heads), the output projections by input features, so each block costs
    one all-reduce in forward and one in backward; norms and embeddings stay replicated."""
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers.children():
        parallelize_module(block, tp_mesh, plan)


def gradient_scale(dims: ParallelDims) -> int:
    """The engines average gradients over the ``dp_cp`` ranks; the loss is scaled up by as much."""
    return dims.dp * dims.cp


def parallelize(
    model: torch.nn.Module,
    dims: ParallelDims,
    mesh: ParallelMesh,
    dp_engine: str,
    activation_checkpoint: str,
    param_dtype: torch.dtype,
    activation_offload: bool = False,
    mlp_tile_tokens: int = 0,
    compile_blocks: bool = False,
) -> torch.nn.Module:
    """Apply tensor parallelism, the memory passes (feed-forward tiling, activation checkpointing
    with optional offload; `lsts.parallel.memory`) and the data-parallel engine to ``model`` (in
    place where the engine allows); returns the module to train."""
    check_supported(dims, dp_engine)
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    for block in model.layers.children():
        if mlp_tile_tokens:
            block.feed_forward = tile_tokens(block.feed_forward, mlp_tile_tokens)
    if activation_checkpoint != "none":
        # "full" recomputes every block in backward; "selective" every other one (torchtitan's
        # layer-selective option), trading half the activation memory saved for less recompute.
        for i, (name, block) in enumerate(list(model.layers.named_children())):
            if activation_checkpoint == "full" or i % 2 == 0:
                model.layers.register_module(name, checkpoint_block(block, offload=activation_offload))
    if compile_blocks:
        # Per block, as torchtitan does: one graph compiled once and reused by every layer. Local
        # attention traces whole; sequence-parallel attention keeps its collectives and host-side
        # checks outside the graph (a break at each attention call).
        for block in model.layers.children():
            block.compile(fullgraph=dims.cp == 1)
    if dims.dp * dims.cp == 1 or dp_engine.startswith("zero"):
        return model
    if dp_engine == "fsdp2":
        shard_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.layers.children():
            fully_shard(block, mesh=shard_mesh, mp_policy=policy)
        fully_shard(model, mesh=shard_mesh, mp_policy=policy)
        return model
    return DistributedDataParallel(model, process_group=mesh["dp_cp"].get_group())


__all__ = ["SUPPORTED_ENGINES", "apply_tensor_parallel", "check_supported", "gradient_scale", "parallelize"]
