"""Distributed multi-head attention by all-to-all (``docs/algorithms.md`` §4; the DeepSpeed-Ulysses
scheme): sequence-sharded ``[B, N/P, H, D]`` -> all-to-all -> head-sharded ``[B, N, H/P, D]`` ->
local attention on whole sequences for a subset of heads -> all-to-all back.

Traffic per link is about 4·N·h/P per layer, independent of P's ring length. Query heads must
divide by P; when the key/value heads do not (GQA with few K/V heads), each K/V head is replicated
just enough that they do. Tokens arrive in the layout's rank order and are put back in global order
before the causal kernel runs, so every layout works.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist

from lsts.kernels.attention import CAUSAL, FULL, Documents, Span, as_documents, attend_rows, attention, document_rows
from lsts.kernels.attention.documents import document_fields
from lsts.parallel.checks import attention_setup
from lsts.parallel.comm import all_to_all
from lsts.parallel.sharding import layout_indices


def replicate_kv_heads(k: torch.Tensor, v: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each K/V head ``world / gcd(H_kv, world)`` times so that the heads split evenly over
    ``world`` ranks while every query head keeps its own K/V head (GQA grouping is preserved)."""
    n_kv = k.shape[2]
    factor = world // math.gcd(n_kv, world)
    if factor == 1:
        return k, v
    return k.repeat_interleave(factor, dim=2), v.repeat_interleave(factor, dim=2)


def check_heads(n_heads: int, world: int, what: str = "ulysses") -> None:
    if n_heads % world != 0:
        raise ValueError(
            f"{what} attention splits the {n_heads} query heads over {world} ranks, which does not divide; "
            f"use a sequence-parallel degree that divides {n_heads}, or ring attention"
        )


def head_shard_span(span: Span, n_heads: int, rank: int, world: int) -> Span:
    """The span of rank ``rank``'s slice of ``n_heads`` heads split over ``world`` ranks: for the
    spans that shift the second half of a layer's heads (S², SF), where that half begins in the slice."""
    if not span.shifts_heads or world == 1:
        return span
    return replace(span, shift_from=max(0, n_heads // 2 - rank * (n_heads // world)))


def layout_order(seq_len: int, world: int, layout: str, ranks: range | None = None) -> torch.Tensor:
    """Global positions of the tokens in the order an all-to-all gathers them (rank by rank)."""
    ranks = range(world) if ranks is None else ranks
    return torch.cat([layout_indices(seq_len, world, r, layout) for r in ranks])


def head_shard_sinks(sinks: torch.Tensor | None, rank: int, world: int) -> torch.Tensor | None:
    """This rank's slice of the per-query-head ``sinks`` after the all-to-all (its heads). Its
    gradient flows back through the slice: each rank's ``sinks.grad`` holds its own heads' part."""
    if sinks is None:
        return None
    n = sinks.shape[0] // world
    return sinks[rank * n : (rank + 1) * n]


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, S_local, H, D]`` -> ``[B, S_local * P, H / P, D]`` (tokens in rank order)."""
    return all_to_all(x, scatter_dim=2, gather_dim=1, group=group)


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of `heads_to_sequence`."""
    return all_to_all(x, scatter_dim=1, gather_dim=2, group=group)


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
    (and ``lse [B, H, S_local]`` float32 when ``return_lse``). Needs ``H % P == 0``.

    ``span`` (overrides ``causal``) and ``cu_seqlens`` (documents of the global sequence, or per
    batch row as in `lsts.kernels.attention.attention`) apply to
    the whole sequence each rank gathers; spans that shift the second half of the heads (S², SF)
    are told where that half begins in this rank's slice of heads (`head_shard_span`).

    ``softcap`` and ``sinks [H]`` (all the layer's query heads, the same on every rank) as in
    `lsts.kernels.attention.attention`; each rank applies the sinks of its heads, so ``sinks.grad``
    on a rank holds its heads' part (sum it over the group as for any replicated parameter)."""
    rows = document_rows(cu_seqlens, q.shape[0])
    if rows is not None:  # each row its own documents
        kw = dict(group=group, causal=causal, layout=layout, softmax_scale=softmax_scale, backend=backend, span=span)
        kw.update(softcap=softcap, sinks=sinks)
        return attend_rows(ulysses_attention, rows, q, k, v, with_lse=return_lse, return_lse=True, **kw)
    span = span if span is not None else (CAUSAL if causal else FULL)
    world = dist.get_world_size(group) if dist.is_initialized() else 1

    def check(w: int) -> None:
        check_heads(q.shape[2], w)

    docs = as_documents(cu_seqlens, q.device, q.shape[1] * world)
    scale, backend = attention_setup(
        q, k, v, group, layout, span, softmax_scale, backend, extra_check=check,
        extra_fields=document_fields(docs), softcap=softcap, sinks=sinks,
    )  # fmt: skip
    k, v = replicate_kv_heads(k, v, world)
    qh, kh, vh = (heads_to_sequence(x, group) for x in (q, k, v))
    order = layout_order(qh.shape[1], world, layout).to(q.device)
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
    out = sequence_to_heads(out, group)
    if not return_lse:
        return out
    with torch.no_grad():
        lse = sequence_to_heads(lse.transpose(1, 2).unsqueeze(-1), group).squeeze(-1).transpose(1, 2)
    return out, lse.contiguous()
