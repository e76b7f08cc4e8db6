"""Distributed multi-head attention by all-to-all (``docs/algorithms.md`` §4; the DeepSpeed-Ulysses
scheme): sequence-sharded ``[B, N/P, H, D]`` -> all-to-all -> head-sharded ``[B, N, H/P, D]`` ->
local attention on whole sequences for a subset of heads -> all-to-all back.

Traffic per link is about 4·N·h/P per layer, independent of P's ring length. Tokens arrive in the
layout's rank order and are put back in global order before the causal kernel runs, so every layout
works.

Any head count (``H >= P``): rank r takes the r-th part of `even_split` (H, P) of the query heads
(the first ``H mod P`` ranks one more: 28 heads on 8 ranks are 4 × 4 + 4 × 3). It receives the K/V
heads its query heads use, one per block of ``g_r`` consecutive query heads, ``g_r`` the largest
divisor of the GQA group size ``H / H_kv`` at which its slice starts and ends (`kv_heads_of_rank`),
so its local attention is GQA with ratio ``g_r``. A K/V head whose group straddles two slices goes
to both; with ``H_kv < P`` heads are replicated the same way. Every rank sends each other rank just
those heads (`all_to_all` with uneven sizes), so the forward and backward stay exact.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist

from lsts.kernels.attention import (
    Documents,
    Span,
    as_documents,
    attend_rows,
    attention,
    document_rows,
    span_of,
)
from lsts.kernels.attention.documents import document_fields
from lsts.parallel.checks import attention_setup
from lsts.parallel.comm import all_to_all, even_split
from lsts.parallel.sharding import DOCUMENT_LAYOUTS, check_document_layout, layout_indices


def replicate_kv_heads(k: torch.Tensor, v: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each K/V head ``world / gcd(H_kv, world)`` times so that the heads split evenly over
    ``world`` ranks while every query head keeps its own K/V head (GQA grouping is preserved)."""
    n_kv = k.shape[2]
    factor = world // math.gcd(n_kv, world)
    if factor == 1:
        return k, v
    return k.repeat_interleave(factor, dim=2), v.repeat_interleave(factor, dim=2)


def check_heads(n_heads: int, world: int, what: str = "ulysses") -> None:
    """The even-split rule of callers that need it (yunchang's `LongContextAttention`)."""
    if n_heads % world != 0:
        raise ValueError(
            f"{what} attention splits the {n_heads} query heads over {world} ranks, which does not divide; "
            f"use a sequence-parallel degree that divides {n_heads}, or ring attention"
        )


def check_head_count(n_heads: int, world: int, what: str = "ulysses") -> None:
    """Every rank needs at least one query head."""
    if n_heads < world:
        raise ValueError(
            f"{what} attention gives each of its {world} ranks some of the {n_heads} query heads: it needs at least "
            f"{world} heads; use a smaller Ulysses degree (or ring attention)"
        )


def head_slice(n_heads: int, rank: int, world: int) -> slice:
    """The query heads of ``rank`` after the all-to-all: its part of `even_split` (n_heads, world)."""
    sizes = even_split(n_heads, world)
    first = sum(sizes[:rank])
    return slice(first, first + sizes[rank])


def kv_heads_of_rank(n_heads: int, n_kv: int, rank: int, world: int) -> list[int]:
    """The K/V heads (global indices, repeats allowed) that ``rank`` receives: one per block of ``g_r``
    query heads of its slice, ``g_r`` the largest divisor of the group size ``n_heads / n_kv`` that
    divides both ends of the slice, so that every block lies in one GQA group and the local call is
    GQA with ratio ``g_r``."""
    group = n_heads // n_kv
    heads = head_slice(n_heads, rank, world)
    step = math.gcd(group, heads.start, heads.stop)
    return [h // group for h in range(heads.start, heads.stop, step)]


def head_shard_span(span: Span, n_heads: int, rank: int, world: int) -> Span:
    """The span of rank ``rank``'s slice of ``n_heads`` heads split over ``world`` ranks: for the
    spans that shift the second half of a layer's heads (S², SF), where that half begins in the slice."""
    if not span.shifts_heads or world == 1:
        return span
    return replace(span, shift_from=max(0, span.first_shifted(n_heads) - head_slice(n_heads, rank, world).start))


def layout_order(seq_len: int, world: int, layout: str, ranks: range | None = None, cu_seqlens=None) -> torch.Tensor:
    """Global positions of the tokens in the order an all-to-all gathers them (rank by rank)."""
    ranks = range(world) if ranks is None else ranks
    return torch.cat([layout_indices(seq_len, world, r, layout, cu_seqlens) for r in ranks])


def head_shard_sinks(sinks: torch.Tensor | None, rank: int, world: int) -> torch.Tensor | None:
    """This rank's slice of the per-query-head ``sinks`` after the all-to-all (its heads). Its
    gradient flows back through the slice: each rank's ``sinks.grad`` holds its own heads' part."""
    if sinks is None:
        return None
    return sinks[head_slice(sinks.shape[0], rank, world)]


def heads_to_sequence(x: torch.Tensor, group, head_sizes: list[int] | None = None) -> torch.Tensor:
    """``[B, S_local, H, D]`` -> ``[B, S_local * P, H_r, D]`` (tokens in rank order), rank r getting
    ``head_sizes[r]`` consecutive heads (default `even_split`)."""
    return all_to_all(x, scatter_dim=2, gather_dim=1, group=group, scatter_sizes=head_sizes)


def sequence_to_heads(x: torch.Tensor, group, head_sizes: list[int] | None = None) -> torch.Tensor:
    """Inverse of `heads_to_sequence` (``head_sizes``: every rank's heads, the same list)."""
    return all_to_all(x, scatter_dim=1, gather_dim=2, group=group, gather_sizes=head_sizes)


def scatter_heads(q, k, v, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence-sharded ``q, k, v`` -> this rank's query heads (`head_slice`) and the K/V heads they
    use (`kv_heads_of_rank`), over the whole gathered sequence (tokens in rank order)."""
    world, n_heads, n_kv = dist.get_world_size(group), q.shape[2], k.shape[2]
    kv_index = [kv_heads_of_rank(n_heads, n_kv, r, world) for r in range(world)]
    sizes = [len(heads) for heads in kv_index]
    index = torch.tensor([h for heads in kv_index for h in heads], device=k.device)
    qh = heads_to_sequence(q, group, even_split(n_heads, world))
    kh, vh = (heads_to_sequence(x.index_select(2, index), group, sizes) for x in (k, v))
    return qh, kh, vh


def heads_back(out: torch.Tensor, lse: torch.Tensor | None, group, n_heads: int):
    """This rank's ``out [B, N, H_r, D]`` (and ``lse [B, H_r, N]``, or None) of its heads, in rank order
    of tokens -> ``out [B, S_local, H, D]`` (and ``lse [B, H, S_local]``, not differentiable)."""
    sizes = even_split(n_heads, dist.get_world_size(group))
    out = sequence_to_heads(out, group, sizes)
    if lse is None:
        return out
    with torch.no_grad():
        lse = sequence_to_heads(lse.transpose(1, 2).unsqueeze(-1), group, sizes).squeeze(-1).transpose(1, 2)
    return out, lse.contiguous()


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    span: Span | None = None,
    cu_seqlens: torch.Tensor | list[int] | Documents | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
):
    """All-to-all head-sharded attention over ``group``: ``q [B, S_local, H, D]``,
    ``k, v [B, S_local, H_kv, D]`` sharded by ``layout`` -> ``out [B, S_local, H, D]``
    (and ``lse [B, H, S_local]`` float32 when ``return_lse``). Any ``H >= P``: the heads split
    unevenly when P does not divide them (see the module docstring).

    ``span`` (overrides ``causal``) and ``cu_seqlens`` (documents of the global sequence, or per
    batch row as in `lsts.kernels.attention.attention`) apply to
    the whole sequence each rank gathers; spans that shift the second half of the heads (S², SF)
    are told where that half begins in this rank's slice of heads (`head_shard_span`).

    ``softcap`` and ``sinks [H]`` (all the layer's query heads, the same on every rank) as in
    `lsts.kernels.attention.attention`; each rank applies the sinks of its heads, so ``sinks.grad``
    on a rank holds its heads' part (sum it over the group as for any replicated parameter)."""
    span = span_of(causal, span)
    rows = document_rows(cu_seqlens, q.shape[0])
    if rows is not None:  # each row its own documents
        kw = dict(group=group, layout=layout, softmax_scale=softmax_scale, backend=backend, span=span)
        kw.update(softcap=softcap, sinks=sinks)
        return attend_rows(ulysses_attention, rows, q, k, v, with_lse=return_lse, return_lse=True, **kw)
    world = dist.get_world_size(group) if dist.is_initialized() else 1

    docs = as_documents(cu_seqlens, q.device, q.shape[1] * world)

    def check(w: int) -> None:
        check_head_count(q.shape[2], w)
        check_document_layout(layout, docs)

    scale, backend = attention_setup(
        q, k, v, group, layout, span, softmax_scale, backend, extra_check=check,
        extra_fields=document_fields(docs), softcap=softcap, sinks=sinks,
    )  # fmt: skip
    qh, kh, vh = scatter_heads(q, k, v, group)
    order = layout_order(qh.shape[1], world, layout, cu_seqlens=docs if layout in DOCUMENT_LAYOUTS else None)
    order = order.to(q.device)
    if layout != "contiguous":  # rank order -> global order, for the causal mask
        inverse = torch.argsort(order)
        qh, kh, vh = (x[:, inverse] for x in (qh, kh, vh))
    rank = dist.get_rank(group)
    shard_span = head_shard_span(span, q.shape[2], rank, world)
    out, lse = attention(
        qh, kh, vh, softmax_scale=scale, backend=backend, span=shard_span, cu_seqlens=docs, softcap=softcap,
        sinks=head_shard_sinks(sinks, rank, world),
    )  # fmt: skip
    if layout != "contiguous":
        out, lse = out[:, order], lse[:, :, order]
    return heads_back(out, lse if return_lse else None, group, q.shape[2])
