"""The parallelize pass of `MASFormer` (kept beside its model, as torchtitan keeps
``models/<name>/parallelize.py``): a model that knows nothing of parallelism in, a distributed one out.

Order (as in torchtitan): tensor parallelism (`apply_tensor_parallel`, the plan that names
MASFormer's projections), the memory passes over its blocks (feed-forward tiling, activation
checkpointing with optional offload; `lsts.parallel.memory`), per-block compilation, then the
generic data-parallel engine over the blocks (`lsts.parallel.data_parallel.apply_data_parallel`).
Context parallelism needs no change to the modules: the model's attention calls receive an
`AttentionContext` (see `lsts.attention.AttentionContext.from_mesh`) that shards the sequence.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lsts.parallel.data_parallel import apply_data_parallel, check_supported
from lsts.parallel.dims import ParallelDims, ParallelMesh
from lsts.parallel.memory import checkpoint_block, tile_tokens


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


def parallelize(
    model: torch.nn.Module,
    dims: ParallelDims,
    mesh: ParallelMesh | None,
    dp_engine: str,
    activation_checkpoint: str,
    param_dtype: torch.dtype,
    activation_offload: bool = False,
    mlp_tile_tokens: int = 0,
    compile_blocks: bool = False,
) -> torch.nn.Module:
    """Apply tensor parallelism, the memory passes and the data-parallel engine to the MASFormer
    ``model`` (in place where the engine allows); returns the module to train."""
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
    return apply_data_parallel(model, model.layers.children(), dims, mesh, dp_engine, param_dtype)


__all__ = ["apply_tensor_parallel", "parallelize"]
