"""Sequence layouts: which global tokens each rank holds, and which ring tiles are unmasked.

Four layouts of a length-N sequence over P ranks (``docs/algorithms.md`` §3):

- ``contiguous``: rank r holds chunk r of P. Simple; under a causal mask rank 0 idles.
- ``zigzag``: 2P chunks; rank r holds chunks r and 2P-1-r. Every ring step costs every rank the same.
- ``stripe``: token i lives on rank i mod P.
- ``balanced``: a function of the pack's ``cu_seqlens`` too: N/P tokens per rank and about the same
  causal-within-document work (`lsts.parallel.balance`); every call that takes it needs ``cu_seqlens``.

A layout is an index map (`layout_indices`), so shard, unshard and global positions are one gather
or scatter each. `ring_tiles` says, for a query shard and a visiting K/V shard, which rectangles of
the score matrix are unmasked under a causal mask: ring attention computes exactly those.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lsts.config import DOCUMENT_LAYOUTS, LAYOUTS, check_layout, seq_len_divisor
from lsts.kernels.attention import CAUSAL, FULL, Documents, Span
from lsts.parallel.balance import balanced_runs, document_boundaries


def check_document_layout(layout: str, docs: Documents | None) -> None:
    """A layout of `DOCUMENT_LAYOUTS` needs the pack's documents, one list shared by the batch rows
    (their shard is a function of it); ValueError otherwise."""
    if layout not in DOCUMENT_LAYOUTS:
        return
    if docs is None:
        raise ValueError(f"layout {layout!r} depends on the documents of the pack: pass its cu_seqlens")
    if docs.row_plan != (0, 0):
        raise ValueError(
            f"layout {layout!r} shards each pack by its own documents, so batch rows with different cu_seqlens "
            f"cannot share one shard; give every row the same documents or one row per call"
        )


def check_seq_len(seq_len: int, layout: str, world: int) -> None:
    """ValueError naming the length, the layout and the nearest valid lengths."""
    div = seq_len_divisor(layout, world)
    if seq_len % div != 0:
        lo, hi = seq_len // div * div, (seq_len // div + 1) * div
        raise ValueError(
            f"sequence length {seq_len} cannot be split by layout {layout!r} over {world} ranks: it must be a "
            f"multiple of {div}; pad or cut it to {lo or hi} or {hi}"
        )


def layout_indices(seq_len: int, world: int, rank: int, layout: str = "zigzag", cu_seqlens=None) -> torch.Tensor:
    """Global positions (int64, ascending within each chunk) of the tokens that ``rank`` holds.
    ``cu_seqlens`` (the pack's document boundaries, ending at ``seq_len``) is required by the
    layouts of `DOCUMENT_LAYOUTS` and checked but without effect for the others, which cut the
    whole pack the same whatever its documents."""
    check_seq_len(seq_len, layout, world)
    if layout in DOCUMENT_LAYOUTS or cu_seqlens is not None:
        if cu_seqlens is None:
            raise ValueError(f"layout {layout!r} depends on the documents of the pack: pass its cu_seqlens")
        cu = document_boundaries(cu_seqlens, seq_len)
        if layout == "balanced":
            return torch.cat([torch.arange(a, b) for a, b in balanced_runs(cu, world)[rank]])
    if layout == "stripe":
        return torch.arange(rank, seq_len, world)
    if layout == "contiguous":
        n = seq_len // world
        return torch.arange(rank * n, (rank + 1) * n)
    c = seq_len // (2 * world)
    return torch.cat(
        [torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)]
    )


def _group_rank_world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sequence_positions(seq_len: int, group=None, layout: str = "zigzag", cu_seqlens=None) -> torch.Tensor:
    """Global position ids (for RoPE) of this rank's tokens under ``layout``: ``[seq_len / P]``
    (``cu_seqlens`` as in `layout_indices`)."""
    rank, world = _group_rank_world(group)
    return layout_indices(seq_len, world, rank, layout, cu_seqlens)


def shard_sequence(x: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag", cu_seqlens=None) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` (the same on every rank) along ``dim``
    (``cu_seqlens``, the documents of ``x``'s packed sequence, as in `layout_indices`)."""
    rank, world = _group_rank_world(group)
    idx = layout_indices(x.shape[dim], world, rank, layout, cu_seqlens).to(x.device)
    return x.index_select(dim, idx)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, dim, layout, cu_seqlens):
        _, world = _group_rank_world(group)
        n_local = x_local.shape[dim]
        ctx.args = (group, dim, layout, cu_seqlens)
        parts = [torch.empty_like(x_local) for _ in range(world)]
        dist.all_gather(parts, x_local.contiguous(), group=group)
        full_idx = torch.cat([layout_indices(n_local * world, world, r, layout, cu_seqlens) for r in range(world)])
        out_shape = list(x_local.shape)
        out_shape[dim] = n_local * world
        out = x_local.new_empty(out_shape)
        out.index_copy_(dim, full_idx.to(x_local.device), torch.cat(parts, dim=dim))
        return out

    @staticmethod
    def backward(ctx, grad):
        group, dim, layout, cu_seqlens = ctx.args
        return shard_sequence(grad, group, dim, layout, cu_seqlens), None, None, None, None


def gather_sequence(
    x_local: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag", cu_seqlens=None
) -> torch.Tensor:
    """Inverse of `shard_sequence`: the full tensor on every rank. Differentiable; the backward
    returns this rank's shard of the gradient (every rank is assumed to compute the same loss)."""
    _, world = _group_rank_world(group)
    check_layout(layout)
    if world == 1:
        return x_local
    return _GatherSequence.apply(x_local, group, dim, layout, cu_seqlens)


@dataclass(frozen=True)
class Tile:
    """An unmasked rectangle of the score matrix between a query shard and a visiting K/V shard:
    rows ``q`` of the local queries against rows ``k`` of the block, attended with ``span`` at the
    global positions ``q_offset + i`` / ``k_offset + j`` of its rows. `ring_tiles` gives offsets 0
    and a square rectangle, where the causal span is the top-left aligned triangle."""

    q: slice
    k: slice
    span: Span = FULL
    q_offset: int = 0
    k_offset: int = 0

    @property
    def causal(self) -> bool:
        return self.span.causal

    def area(self) -> int:
        """Number of unmasked (query, key) pairs of a `ring_tiles` tile."""
        nq, nk = self.q.stop - self.q.start, self.k.stop - self.k.start
        return nq * (nq + 1) // 2 if self.causal else nq * nk


def ring_tiles(layout: str, rank: int, src: int, world: int, s_local: int, causal: bool) -> list[Tile]:
    """Tiles that rank ``rank``'s queries compute against the K/V shard of rank ``src``.

    Under a causal mask, masked work is skipped exactly: contiguous skips blocks from later ranks;
    zigzag computes half a block (the earlier half of a lower rank's pair, or the later local half
    against a higher rank's pair); stripe is causal against ranks up to its own and strictly causal
    (queries 1.., keys ..-1) against later ranks."""
    everything = slice(0, s_local)
    if not causal:
        return [Tile(everything, everything)]
    if src == rank:
        return [Tile(everything, everything, CAUSAL)]
    if layout == "contiguous":
        return [Tile(everything, everything)] if src < rank else []
    if layout == "zigzag":
        half = s_local // 2
        if src < rank:
            return [Tile(everything, slice(0, half))]
        return [Tile(slice(half, s_local), everything)]
    if layout == "stripe":
        if src < rank:
            return [Tile(everything, everything, CAUSAL)]
        return [Tile(slice(1, s_local), slice(0, s_local - 1), CAUSAL)] if s_local > 1 else []
    plain = tuple(name for name in LAYOUTS if name not in DOCUMENT_LAYOUTS)
    raise ValueError(f"no plain ring tiles for layout {layout!r}; choose one of {plain} (or call tiles())")


def shard_chunks(
    layout: str, rank: int, world: int, s_local: int, docs: Documents | None = None
) -> list[tuple[slice, int]]:
    """The contiguous runs of global positions in a shard: ``(local slice, first global position)``.
    Stripe has none longer than a token: spans and documents need zigzag, contiguous or balanced;
    balanced needs the pack's ``docs``."""
    if layout == "contiguous":
        return [(slice(0, s_local), rank * s_local)]
    if layout == "zigzag":
        c = s_local // 2
        return [(slice(0, c), rank * c), (slice(c, s_local), (2 * world - 1 - rank) * c)]
    if layout == "balanced":
        if docs is None:
            raise ValueError("layout 'balanced' depends on the documents of the pack: pass its cu_seqlens")
        out, local = [], 0
        for first, stop in balanced_runs(document_boundaries(docs, s_local * world), world)[rank]:
            out.append((slice(local, local + stop - first), first))
            local += stop - first
        return out
    raise ValueError(
        f"spans and packed documents need layout 'zigzag' or 'contiguous' (or 'balanced', with cu_seqlens), "
        f"not {layout!r}"
    )


def _reach(span: Span, docs: Documents | None, first: int, last: int) -> tuple[int, float]:
    """Global keys ``[lo, hi)`` that queries ``first..last`` may reach, over every head's shift."""
    shifts = span.shifts()
    ranges = [span.key_range(first, last, s) for s in shifts]
    lo = min(r[0] for r in ranges)
    hi = max(math.inf if r[1] is None else r[1] for r in ranges)
    if docs is not None:
        d_lo, d_hi = docs.bounds(first, last)
        lo, hi = max(lo, d_lo), min(hi, d_hi)
    return lo, hi


def tiles(layout, rank, src, world, s_local, span: Span, docs: Documents | None = None) -> list[Tile]:
    """The tiles of a ring step for any span: `ring_tiles` for plain causal or full attention;
    otherwise every pair of contiguous runs (see `shard_chunks`) that the span (and the documents)
    can reach, at its global offsets. The kernels skip what is masked inside a tile."""
    if docs is None and span.kind in ("causal", "full") and layout not in DOCUMENT_LAYOUTS:
        return ring_tiles(layout, rank, src, world, s_local, span.causal)
    out = []
    k_chunks = shard_chunks(layout, src, world, s_local, docs)
    # Runs come in ascending global order, disjoint: the runs in reach are one slice of them, found by
    # bisection (a balanced shard of many short documents has many runs).
    k_ends = [k_first + k_rows.stop - k_rows.start for k_rows, k_first in k_chunks]
    for q_rows, q_first in shard_chunks(layout, rank, world, s_local, docs):
        n_q = q_rows.stop - q_rows.start
        lo, hi = _reach(span, docs, q_first, q_first + n_q - 1)
        # Sinks lie in the first documents; a query sees them only from one of those.
        sees_sinks = span.n_sink > 0 and (docs is None or docs.bounds(q_first, q_first)[0] < span.n_sink)
        for i in range(0 if sees_sinks else bisect_right(k_ends, lo), len(k_chunks)):
            k_rows, k_first = k_chunks[i]
            sinks = sees_sinks and k_first < span.n_sink
            if k_first >= hi and not sinks:
                break
            if sinks or max(lo, k_first) < min(hi, k_ends[i]):
                out.append(Tile(q_rows, k_rows, span, q_first, k_first))
    return out
