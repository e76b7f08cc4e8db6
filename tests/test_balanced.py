"""The ``balanced`` layout: N/P tokens per rank with about equal causal-within-document work, and
ring / Ulysses attention on it against the float64 oracle with the document mask written out
(out, lse, dq, dk, dv), on 2 and 3 gloo ranks (4: slow). One spawn per world size runs every case."""

import numpy as np
import pytest
import torch

from lsts.kernels.attention import Documents, Span
from lsts.parallel import (
    gather_sequence,
    layout_indices,
    ring_attention,
    sequence_positions,
    shard_sequence,
    ulysses_attention,
)
from lsts.parallel.balance import work_per_rank
from lsts.parallel.sharding import tiles
from tests.distributed import errors_on_all_ranks, run_ranks
from tests.oracle import rel_err
from tests.test_varlen_attention import oracle_masked

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def _pairs_by_hand(cu, idx) -> int:
    """Causal-within-document pairs of the queries ``idx``, counted one key at a time."""
    total = 0
    for p in idx.tolist():
        start = max(c for c in cu if c <= p)
        total += len(range(start, p + 1))
    return total


def _random_pack(n: int, seed: int, median: float) -> list[int]:
    """Boundaries of a pack of ``n`` tokens with log-normal document lengths (the last one cut)."""
    rng = np.random.default_rng(seed)
    cu = [0]
    while cu[-1] < n:
        cu.append(min(n, cu[-1] + max(1, int(rng.lognormal(np.log(median), 1.2)))))
    return cu


def _packs(world: int) -> dict[str, list[int]]:
    """The document patterns of the oracle cases; lengths are multiples of ``world`` only."""
    n = 15 * world  # odd on 3 ranks
    return {
        "random": _random_pack(n, seed=world, median=4),  # many documents shorter than a chunk
        "single": [0, n],
        "spanning": [0, 2, n - 3, n],  # one document across every rank, short ones around it
        "tiny": [*range(n // 2), n],  # one-token documents, then a long one
    }


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_balanced_partitions_the_pack_evenly(world):
    for name, cu in _packs(world).items():
        n = cu[-1]
        parts = [layout_indices(n, world, r, "balanced", cu_seqlens=cu) for r in range(world)]
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(n)), name
        assert all(len(p) == n // world for p in parts), name
        assert all(torch.equal(p, torch.sort(p).values) for p in parts), name
        again = layout_indices(n, world, 1, "balanced", cu_seqlens=torch.tensor(cu))  # pure: same input, same map
        assert torch.equal(again, parts[1]), name
        assert work_per_rank(cu, world, parts) == [_pairs_by_hand(cu, p) for p in parts], name


@pytest.mark.parametrize("world", [2, 4, 8])
def test_balanced_beats_whole_pack_zigzag_on_long_tailed_packs(world):
    for seed in range(3):
        cu = _random_pack(8192, seed=seed, median=256)
        zigzag = work_per_rank(cu, world, [layout_indices(8192, world, r, "zigzag") for r in range(world)])
        balanced = work_per_rank(
            cu, world, [layout_indices(8192, world, r, "balanced", cu_seqlens=cu) for r in range(world)]
        )
        imbalance = [max(w) * world / sum(w) for w in (zigzag, balanced)]
        assert imbalance[1] <= 1.05, (seed, imbalance)
        assert imbalance[1] <= imbalance[0], (seed, imbalance)


def test_balanced_needs_the_documents():
    with pytest.raises(ValueError, match="pass its cu_seqlens"):
        layout_indices(12, 2, 0, "balanced")
    with pytest.raises(ValueError, match="ending at the sequence length 12"):
        layout_indices(12, 2, 0, "balanced", cu_seqlens=[0, 5, 10])
    with pytest.raises(ValueError, match="multiple of 2"):
        layout_indices(13, 2, 0, "balanced", cu_seqlens=[0, 5, 13])


def test_balanced_ring_visits_only_reachable_runs():
    """Documents that never meet across two ranks give those ranks no tile."""
    world, cu = 2, [0, 8, 16]  # two documents: each long enough to be cut over both ranks
    docs = Documents.from_cu_seqlens(cu)
    for rank in range(world):
        for src in range(world):
            for t in tiles("balanced", rank, src, world, 8, Span("causal"), docs):
                q_doc = docs.bounds(t.q_offset, t.q_offset + t.q.stop - t.q.start - 1)
                k_doc = docs.bounds(t.k_offset, t.k_offset + t.k.stop - t.k.start - 1)
                assert max(q_doc[0], k_doc[0]) < min(q_doc[1], k_doc[1]), (rank, src, t)
                assert t.k_offset <= t.q_offset + (t.q.stop - t.q.start) - 1, (rank, src, t)  # causal reach


SPANS = {"causal": Span("causal"), "window-5": Span("window", 5)}
METHODS = {"ring": ring_attention, "ulysses": ulysses_attention}
CASES = [(m, p, s) for m in METHODS for p in ("random", "single", "spanning", "tiny") for s in SPANS]


def _all_cases(rank, world):
    results = {}
    for method, pack, span_name in CASES:
        cu = _packs(world)[pack]
        n = cu[-1]
        g = torch.Generator().manual_seed(len(results))
        q, dout = (torch.randn(1, n, HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        kw = dict(layout="balanced", cu_seqlens=cu)
        local = [shard_sequence(x, **kw).requires_grad_() for x in (q, k, v)]
        span = SPANS[span_name]
        out, lse = METHODS[method](*local, span=span, return_lse=True, backend="torch", **kw)
        out.backward(shard_sequence(dout, **kw))
        got = [gather_sequence(x.detach(), **kw) for x in (out, lse.transpose(1, 2).contiguous())]
        got += [gather_sequence(x.grad, **kw) for x in local]
        got[1] = got[1].transpose(1, 2)
        want = oracle_masked(q, k, v, dout, span, 0, 0, cu)
        results[(method, pack, span_name)] = {
            name: rel_err(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want)
        }
    results["positions"] = sequence_positions(n, layout="balanced", cu_seqlens=cu).tolist()
    return results


@pytest.fixture(scope="module", params=[2, 3, pytest.param(4, marks=pytest.mark.slow)], ids=lambda w: f"world{w}")
def world_results(request):
    return request.param, run_ranks(_all_cases, request.param)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_balanced_attention_matches_oracle(world_results, case):
    for rank, results in enumerate(world_results[1]):
        errs = results[case]
        assert max(errs.values()) <= 1e-10, f"rank {rank}: {errs}"


def test_balanced_positions_are_the_shard(world_results):
    world, results = world_results
    cu = _packs(world)["tiny"]
    for rank, r in enumerate(results):
        assert r["positions"] == layout_indices(cu[-1], world, rank, "balanced", cu_seqlens=cu).tolist()


def test_balanced_without_documents_errs_on_every_rank():
    errors = errors_on_all_ranks(_no_documents, 2)
    assert all("pass its cu_seqlens" in e for e in errors), errors


def _no_documents(rank, world):
    q = torch.randn(1, 8, 2, 8)
    ring_attention(q, q, q, layout="balanced", backend="torch")


def test_balanced_with_other_documents_per_row_errs_on_every_rank():
    errors = errors_on_all_ranks(_documents_per_row, 2)
    assert all("cannot share one shard" in e for e in errors), errors


def _documents_per_row(rank, world):
    q = torch.randn(2, 4, 2, 8)
    ring_attention(q, q, q, layout="balanced", cu_seqlens=[[0, 3, 8], [0, 5, 8]], backend="torch")


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "balanced"])
@pytest.mark.parametrize("span", [Span("causal"), Span("window", 5), Span("sf", 6, 3)], ids=lambda s: s.kind)
def test_ring_tiles_cover_every_pair_that_documents_and_span_allow(layout, span):
    """Every unmasked (query, key) pair of the whole pack lies in a tile of its ring step; the
    runs are found by bisection, so a missed run would show here."""
    for world in (2, 3, 4):
        for seed in range(3):
            n = 2 * world * 6
            cu = _random_pack(n, seed=seed, median=3)
            docs = Documents.from_cu_seqlens(cu)
            pos = [layout_indices(n, world, r, layout, cu_seqlens=cu) for r in range(world)]
            same_doc = docs.mask(torch.arange(n), torch.arange(n))
            allowed = span.mask(torch.arange(n), torch.arange(n), 2).any(0) & same_doc  # any head (S², SF shift half)
            for rank in range(world):
                for src in range(world):
                    covered = torch.zeros(n // world, n // world, dtype=torch.bool)
                    for t in tiles(layout, rank, src, world, n // world, span, docs):
                        covered[t.q, t.k] = True
                    need = allowed[pos[rank][:, None], pos[src][None, :]]
                    assert not (need & ~covered).any(), (world, seed, rank, src)
