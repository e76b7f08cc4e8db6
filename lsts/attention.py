"""The one attention API of lsts models: ``attention(q, k, v, span, ctx)``.

A model calls this with its layer's `Span` and knows nothing else: the `AttentionContext` that the
parallelize pass (or a test) hands it says which kernels run and whether, and how, the sequence is
sharded. Local attention, ring, Ulysses and the hybrid all return the same thing, so a model with
``ctx.mode == "local"`` on the whole sequence equals the same model sharded over ``cp`` ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from lsts.kernels.attention import CAUSAL, Documents, Span, check_softcap_sinks
from lsts.kernels.attention import attention as local_attention
from lsts.parallel import hybrid_attention, ring_attention, ulysses_attention
from lsts.parallel.dims import ParallelDims, ParallelMesh


@dataclass(frozen=True)
class AttentionContext:
    """How attention runs. ``mode`` "local" attends the tensors as given; "ring", "ulysses" and
    "hybrid" treat them as this rank's shard of the sequence under ``layout`` over ``ring_group``
    and/or ``ulysses_group``. ``documents`` (global, shared by the batch rows) keeps attention inside
    packed documents."""

    mode: str = "local"  # a key of CP_METHODS
    backend: str = "auto"
    layout: str = "zigzag"
    ring_group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    documents: Documents | None = None
    # Hugging Face layers may read packed documents from their inputs (restarting position_ids,
    # cu_seq_lens) when ``documents`` is None; the lsts trainers, which set ``documents``
    # themselves (or deliberately none), turn this off.
    infer_documents: bool = True

    def __post_init__(self) -> None:
        if self.mode not in CP_METHODS:
            raise ValueError(f"unknown attention mode {self.mode!r}; choose one of {tuple(CP_METHODS)}")

    @classmethod
    def from_mesh(cls, dims: ParallelDims, mesh: ParallelMesh | None, backend: str, layout: str) -> AttentionContext:
        """The context of a run: local attention without context parallelism; ring, Ulysses or both
        over the mesh's ``cp_ring`` / ``cp_ulysses`` axes (``mesh`` may be None when ``dims.cp == 1``)."""
        if dims.cp == 1:
            return cls("local", backend, layout)
        ring = mesh["cp_ring"].get_group() if dims.cp_ring > 1 else None
        uly = mesh["cp_ulysses"].get_group() if dims.cp_ulysses > 1 else None
        mode = "hybrid" if ring and uly else ("ring" if ring else "ulysses")
        return cls(mode, backend, layout, ring_group=ring, ulysses_group=uly)

    def with_documents(self, cu_seqlens: torch.Tensor | list[int] | None) -> AttentionContext:
        """The same context for one batch of packed sequences (None: no document masking)."""
        docs = None if cu_seqlens is None else Documents.from_cu_seqlens(cu_seqlens)
        return replace(self, documents=docs)


# _SEQUENCE_PARALLEL_EAGER: under torch.compile the sequence-parallel methods run eagerly, one break
# in the block's graph per call. Traced, dynamo would walk into their host-side plans, collectives
# and autograd Functions and cut the block into many small graphs, each with its own guards.
def _local(q, k, v, ctx: AttentionContext, **kw) -> torch.Tensor:
    return local_attention(q, k, v, **kw)[0]


@torch.compiler.disable  # see _SEQUENCE_PARALLEL_EAGER
def _ring(q, k, v, ctx: AttentionContext, **kw) -> torch.Tensor:
    return ring_attention(q, k, v, ctx.ring_group, layout=ctx.layout, **kw)


@torch.compiler.disable  # see _SEQUENCE_PARALLEL_EAGER
def _ulysses(q, k, v, ctx: AttentionContext, **kw) -> torch.Tensor:
    return ulysses_attention(q, k, v, ctx.ulysses_group, layout=ctx.layout, **kw)


@torch.compiler.disable  # see _SEQUENCE_PARALLEL_EAGER
def _hybrid(q, k, v, ctx: AttentionContext, **kw) -> torch.Tensor:
    return hybrid_attention(q, k, v, ctx.ring_group, ctx.ulysses_group, layout=ctx.layout, **kw)


# The attention methods by `AttentionContext.mode`, the one list of them: ``fn(q, k, v, ctx, *, span,
# cu_seqlens, backend, softmax_scale, softcap, sinks) -> out``, ``q, k, v`` this rank's shard of the
# sequence under ``ctx.layout``. A new context-parallel method is its module in `lsts.parallel` and
# one line here (docs/architecture.md).
CP_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "local": _local,
    "ring": _ring,
    "ulysses": _ulysses,
    "hybrid": _hybrid,
}
LOCAL = AttentionContext()


@dataclass(frozen=True)
class RolledS2:
    """LongLoRA's S²-Attn as the paper's Algorithm 1 writes it, for ablations only: the shifted half
    of the heads rolls the sequence by -G/2, attends causally within groups of ``size`` = G, and
    rolls back. Tokens ``0 .. G/2-1`` then share a group with the last G/2 tokens and see them: a
    leak of (G/2)² future pairs per shifted head. The default `Span("s2", G)` has no such leak.
    Rolling needs the whole sequence: one device only."""

    size: int
    kind: str = "s2roll"

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % 2:
            raise ValueError(f"the rolled S² group must be positive and even, got {self.size}")


def rolled_s2_attention(
    q, k, v, span: RolledS2, ctx: AttentionContext, softmax_scale=None, softcap: float = 0.0, sinks=None
) -> torch.Tensor:
    """`RolledS2` attention of whole sequences (``q [B, N, H, D]``, ``k, v [B, N, H_kv, D]``);
    ``softcap`` and ``sinks`` as in `attention`."""
    check_softcap_sinks(q, softcap, sinks)
    if ctx.mode != "local" or ctx.documents is not None:
        raise ValueError("the rolled S² ablation attends one whole, unpacked sequence: use a local context")
    if q.shape[1] % span.size:
        raise ValueError(f"the rolled S² groups ({span.size}) must divide the sequence length {q.shape[1]}")
    h, h_kv, shift = q.shape[2], k.shape[2], span.size // 2
    kv_head = torch.arange(h, device=q.device) // (h // h_kv)  # each query head's K/V head (GQA)
    block = Span("block", span.size)
    outs = []
    for heads, roll in ((slice(0, h // 2), 0), (slice(h // 2, h), shift)):
        idx = kv_head[heads]
        qh, kh, vh = q[:, :, heads], k.index_select(2, idx), v.index_select(2, idx)
        qh, kh, vh = (x.roll(-roll, dims=1) for x in (qh, kh, vh))
        head_sinks = None if sinks is None else sinks[heads]
        out = local_attention(
            qh, kh, vh, span=block, backend=ctx.backend, softmax_scale=softmax_scale, softcap=softcap, sinks=head_sinks
        )[0]
        outs.append(out.roll(roll, dims=1))
    return torch.cat(outs, dim=2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    span: Span = CAUSAL,
    ctx: AttentionContext = LOCAL,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q [B, S, H, D]``, ``k, v [B, S, H_kv, D]`` (``S`` local under sequence parallelism)
    -> ``out [B, S, H, D]``, attended with ``span`` as ``ctx`` says (scale ``1/sqrt(D)`` by default).
    ``softcap`` (Gemma2's logit cap, 0 = off) and ``sinks [H]`` (gpt-oss' learnable sink logits,
    one per query head) as in `lsts.kernels.attention.attention`, under every mode."""
    if isinstance(span, RolledS2):
        return rolled_s2_attention(q, k, v, span, ctx, softmax_scale, softcap, sinks)
    kw = {"span": span, "cu_seqlens": ctx.documents, "backend": ctx.backend, "softmax_scale": softmax_scale}
    return CP_METHODS[ctx.mode](q, k, v, ctx, softcap=softcap, sinks=sinks, **kw)


__all__ = ["CP_METHODS", "LOCAL", "AttentionContext", "RolledS2", "attention", "rolled_s2_attention"]
