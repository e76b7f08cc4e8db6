"""The ``balanced`` layout: a sharding of a packed sequence that gives every rank the same number of
tokens *and* about the same attention work under causal-within-document masking.

Whole-pack zigzag balances a causal mask over one sequence, but with packed documents a token's
work is its offset in its document plus one (the keys it attends), so a rank holding the middle
of a long document does far more than one holding short documents. The plan here:

1. Long documents (work above a threshold) are cut head/tail, as zigzag cuts a whole sequence:
   into ``2P`` near-equal chunks, rank r taking chunks r and 2P-1-r; the pairs are rotated from one
   long document to the next so that the one-token rounding does not pile up on one rank.
2. Short documents stay whole and go, heaviest first, to the rank with the least work that has room.
3. Every rank holds exactly ``N / P`` tokens: a piece that does not fit where it is sent is cut,
   the rest going to the least-loaded rank with room (so any lengths work, without per-document
   padding; ``N`` must be a multiple of ``P``).

The threshold is picked per pack among a few fractions of the per-rank work, keeping the largest
(fewest runs: fewer, larger ring tiles) whose imbalance (max / mean work) is within 1 % of the best.
Everything is a pure function of ``(cu_seqlens, P)``, so every rank computes the same plan alone.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import torch

# Fractions of the per-rank work above which a document is cut head/tail, largest (fewest runs) first.
_SPLIT_FRACTIONS = (1.0, 0.25, 1 / 16, 1 / 64, 0.0)
_TOLERANCE = 1.01


def run_work(first: int, stop: int, doc_start: int) -> int:
    """Unmasked (query, key) pairs of the queries ``[first, stop)`` of a document starting at
    ``doc_start`` under a causal mask: query p attends ``p - doc_start + 1`` keys."""
    n = stop - first
    return n * (first + stop - 2 * doc_start + 1) // 2


def document_boundaries(cu_seqlens, seq_len: int) -> tuple[int, ...]:
    """``cu_seqlens`` (list, tensor or `Documents`) as a tuple of ints, checked to start at 0,
    strictly increase and end at ``seq_len``."""
    cu = getattr(cu_seqlens, "cu", cu_seqlens)
    cu = torch.as_tensor(cu, dtype=torch.int64).cpu()
    if cu.dim() != 1 or len(cu) < 2 or cu[0] != 0 or bool((cu[1:] <= cu[:-1]).any()) or cu[-1] != seq_len:
        raise ValueError(
            f"layout 'balanced' needs the pack's cu_seqlens: 1-D, from 0, strictly increasing, ending at the "
            f"sequence length {seq_len}; got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''} (one list shared "
            f"by every batch row)"
        )
    return tuple(cu.tolist())


class _Plan:
    """Runs, tokens and work of every rank while a plan is built."""

    def __init__(self, world: int, capacity: int):
        self.capacity = capacity
        self.runs: list[list[tuple[int, int]]] = [[] for _ in range(world)]
        self.tokens = [0] * world
        self.work = [0] * world

    def lightest_with_room(self) -> int:
        return min((r for r in range(len(self.work)) if self.tokens[r] < self.capacity), key=lambda r: self.work[r])

    def place(self, pieces: list[tuple[int, int]], doc_start: int, rank: int | None = None) -> None:
        """Give ``pieces`` (runs of one document) to ``rank`` (default: the lightest with room),
        cutting them where the rank is full; the rest goes to the lightest rank with room."""
        pieces = [p for p in pieces if p[1] > p[0]]
        while pieces:
            r = self.lightest_with_room() if rank is None or self.tokens[rank] >= self.capacity else rank
            first, stop = pieces.pop(0)
            take = min(stop - first, self.capacity - self.tokens[r])
            self.runs[r].append((first, first + take))
            self.tokens[r] += take
            self.work[r] += run_work(first, first + take, doc_start)
            if first + take < stop:
                pieces.insert(0, (first + take, stop))
                rank = None


def _build(cu: tuple[int, ...], world: int, threshold: float) -> _Plan:
    plan = _Plan(world, cu[-1] // world)
    docs = list(pairwise(cu))
    long_docs = [d for d in docs if run_work(d[0], d[1], d[0]) > threshold]
    short = sorted((d for d in docs if run_work(d[0], d[1], d[0]) <= threshold), key=lambda d: d[0] - d[1])
    for j, (start, end) in enumerate(long_docs):
        n = end - start
        cut = [start + i * n // (2 * world) for i in range(2 * world + 1)]
        for pair in range(world):
            tail = 2 * world - 1 - pair
            pieces = [(cut[pair], cut[pair + 1]), (cut[tail], cut[tail + 1])]
            plan.place(pieces, start, rank=(pair + j) % world)
    for start, end in short:
        plan.place([(start, end)], start)
    return plan


def imbalance(work: list[int]) -> float:
    """max / mean of the work per rank (1.0: perfectly balanced)."""
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0


def split_plan(
    cu: tuple[int, ...], world: int, split_fraction: float
) -> tuple[tuple[tuple[tuple[int, int], ...], ...], list[int]]:
    """``(runs, work)`` per rank of the plan that cuts head/tail the documents whose work exceeds
    ``split_fraction`` × the per-rank work (0: every document; inf: none) and places the rest whole."""
    per_rank = sum(run_work(a, b, a) for a, b in pairwise(cu)) / world
    plan = _build(cu, world, split_fraction * per_rank)
    return tuple(_merged(runs) for runs in plan.runs), plan.work


@lru_cache(maxsize=64)
def balanced_runs(cu: tuple[int, ...], world: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per rank, its ascending, merged runs ``(first, stop)`` of global positions under the balanced
    layout of the pack ``cu`` (``cu[-1]`` a multiple of ``world``)."""
    plans = [split_plan(cu, world, f) for f in _SPLIT_FRACTIONS]
    best = min(imbalance(work) for _, work in plans)
    return next(runs for runs, work in plans if imbalance(work) <= best * _TOLERANCE)


def _merged(runs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for first, stop in sorted(runs):
        if out and out[-1][1] == first:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((first, stop))
    return tuple(out)


def work_per_rank(cu_seqlens, world: int, indices: list[torch.Tensor]) -> list[int]:
    """Unmasked causal-within-document (query, key) pairs each rank computes when it holds the
    global positions ``indices[r]``: the sum over its queries of their offset in their document + 1."""
    cu = torch.as_tensor(document_boundaries(cu_seqlens, int(sum(len(i) for i in indices))))
    out = []
    for idx in indices:
        doc = torch.searchsorted(cu, idx, right=True) - 1
        out.append(int((idx - cu[doc] + 1).sum()))
    return out


__all__ = ["balanced_runs", "document_boundaries", "imbalance", "run_work", "split_plan", "work_per_rank"]
