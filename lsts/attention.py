"""The one attention API of lsts models: ``attention(q, k, v, span, ctx)``.

A model calls this with its layer's `Span` and knows nothing else: the `AttentionContext` that the
parallelize pass (or a test) hands it says which kernels run and whether, and how, the sequence is
sharded. Local attention, ring, Ulysses and the hybrid all return the same thing, so a model with
``ctx.mode == "local"`` on the whole sequence equals the same model sharded over ``cp`` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist

from lsts.kernels.attention import CAUSAL, Documents, Span
from lsts.kernels.attention import attention as local_attention
from lsts.parallel import hybrid_attention, ring_attention, ulysses_attention

Mode = Literal["local", "ring", "ulysses", "hybrid"]


@dataclass(frozen=True)
class AttentionContext:
    """How attention runs. ``mode`` "local" attends the tensors as given; "ring", "ulysses" and
    "hybrid" treat them as this rank's shard of the sequence under ``layout`` over ``ring_group``
    and/or ``ulysses_group``. ``documents`` (global, shared by the batch rows) keeps attention inside
    packed documents."""

    mode: Mode = "local"
    backend: str = "auto"
    layout: str = "zigzag"
    ring_group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    documents: Documents | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("local", "ring", "ulysses", "hybrid"):
            raise ValueError(f"unknown attention mode {self.mode!r}; choose local, ring, ulysses or hybrid")

    def with_documents(self, cu_seqlens: torch.Tensor | list[int] | None) -> AttentionContext:
        """The same context for one batch of packed sequences (None: no document masking)."""
        docs = None if cu_seqlens is None else Documents.from_cu_seqlens(cu_seqlens)
        return replace(self, documents=docs)


LOCAL = AttentionContext()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    span: Span = CAUSAL,
    ctx: AttentionContext = LOCAL,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``q [B, S, H, D]``, ``k, v [B, S, H_kv, D]`` (``S`` local under sequence parallelism)
    -> ``out [B, S, H, D]``, attended with ``span`` as ``ctx`` says (scale ``1/sqrt(D)`` by default)."""
    kw = {"span": span, "cu_seqlens": ctx.documents, "backend": ctx.backend, "softmax_scale": softmax_scale}
    if ctx.mode == "local":
        return local_attention(q, k, v, **kw)[0]
    if ctx.mode == "ring":
        return ring_attention(q, k, v, ctx.ring_group, layout=ctx.layout, **kw)
    if ctx.mode == "ulysses":
        return ulysses_attention(q, k, v, ctx.ulysses_group, layout=ctx.layout, **kw)
    return hybrid_attention(q, k, v, ctx.ring_group, ctx.ulysses_group, layout=ctx.layout, **kw)


__all__ = ["LOCAL", "AttentionContext", "attention"]
