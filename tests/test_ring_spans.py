"""Ring attention with spans (window, block, LongLoRA S², SinkLoRA SF) and packed documents against
the float64 single-process oracle with the mask written out, on 2 and 3 gloo ranks, zigzag and
contiguous layouts: out, lse, dq, dk, dv. Spans whose reach fits a run take the halo exchange, the
others the ring. Ulysses takes every span: S² / SF learn where the shifted heads begin in each
rank's slice of heads (on 3 ranks a slice holds both kinds). One spawn per world size runs every
case."""

import functools

import pytest
import torch

from lsts.kernels.attention import Span
from lsts.parallel import gather_sequence, hybrid_attention, ring_attention, shard_sequence, ulysses_attention
from lsts.parallel.sharding import tiles
from tests.distributed import errors_on_all_ranks, run_ranks
from tests.oracle import rel_err
from tests.test_varlen_attention import oracle_masked

CHUNK, HEADS, KV_HEADS, HEAD_DIM = 13, 6, 2, 16
SPANS = {
    "causal": Span("causal"),
    "window-9": Span("window", 9),  # narrower than a run (13): the halo exchange
    "window-20": Span("window", 20),  # wider: the ring (zigzag), visiting only reachable runs
    "block-10": Span("block", 10),
    "block-16": Span("block", 16),
    "s2-12": Span("s2", 12),  # groups straddle runs: the halo
    "sf-12-sink4": Span("sf", 12, 4),
    "s2-40": Span("s2", 40),  # reach wider than a run (zigzag): the ring
    "sf-12-sink16": Span("sf", 12, 16),  # sinks beyond rank 0's first run: the ring
}
# LongLoRA's alignment: the group is a run (N = 2 * world * ALIGNED_CHUNK), so groups lie inside
# ranks and only the shifted half-groups straddle them; the value is n_sink (0: S²).
ALIGNED_CHUNK = 16
ALIGNED = {"s2-aligned": 0, "sf-aligned-sink4": 4}


def _documents(n):
    """Odd boundaries, one straddling every rank boundary of both layouts on 2 and 3 ranks."""
    return [0, 3, n // 3 + 1, n // 2 + 2, n - 5, n]


METHODS = {"ring": ring_attention, "ulysses": ulysses_attention}
CASES = [
    (method, layout, span, docs)
    for method in METHODS
    for layout in ("zigzag", "contiguous")
    for span in (*SPANS, *ALIGNED)
    for docs in (False, True)
    # Ulysses attends whole sequences per head slice: the spans' shapes matter, not how they cut runs.
    if method == "ring" or span in ("causal", "window-9", "block-10", "s2-12", "sf-12-sink4", "sf-12-sink16")
]


def _problem(layout: str, span_name: str, world: int) -> tuple[int, Span]:
    """Sequence length and span of a case."""
    if span_name in ALIGNED:
        n = 2 * world * ALIGNED_CHUNK
        run = n // (2 * world) if layout == "zigzag" else n // world
        n_sink = ALIGNED[span_name]
        return n, Span("sf" if n_sink else "s2", run, n_sink)
    return (2 if layout == "zigzag" else 1) * CHUNK * world, SPANS[span_name]


def _case_errors(fn, layout: str, n: int, span: Span, cu, seed: int) -> dict[str, float]:
    """Relative errors of ``fn`` (sharded, forward and backward, gathered) against the oracle."""
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(1, n, HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    local = [shard_sequence(x, layout=layout).requires_grad_() for x in (q, k, v)]
    out, lse = fn(*local, layout=layout, span=span, cu_seqlens=cu, return_lse=True, backend="torch")
    out.backward(shard_sequence(dout, layout=layout))
    lse_t = lse.transpose(1, 2).contiguous()
    got = [gather_sequence(x.detach(), layout=layout) for x in (out, lse_t, *(x.grad for x in local))]
    got[1] = got[1].transpose(1, 2)
    want = oracle_masked(q, k, v, dout, span, 0, 0, [0, n] if cu is None else cu)
    errs = {}
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        finite = torch.isfinite(b)
        errs[name] = rel_err(a[finite], b[finite]) if torch.equal(torch.isfinite(a), finite) else float("inf")
    return errs


def _all_cases(rank, world):
    results = {}
    for method, layout, span_name, with_docs in CASES:
        n, span = _problem(layout, span_name, world)
        cu = _documents(n) if with_docs else None
        case = (method, layout, span_name, with_docs)
        results[case] = _case_errors(METHODS[method], layout, n, span, cu, seed=len(results))
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_results(request):
    return run_ranks(_all_cases, request.param)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}{'-docs' if c[3] else ''}")
def test_ring_span_matches_oracle(world_results, case):
    for rank, results in enumerate(world_results):
        errs = results[case]
        assert max(errs.values()) <= 1e-10, f"rank {rank}: {errs}"


def test_window_ring_skips_unreachable_steps():
    """A window shorter than a chunk reaches only the neighbouring runs: far ring steps have no tile."""
    world, s_local = 4, 64
    span = Span("window", 16)
    counts = [len(tiles("contiguous", 3, src, world, s_local, span)) for src in range(world)]
    assert counts == [0, 0, 1, 1]


def test_stripe_with_a_span_is_a_clear_error():
    errors = errors_on_all_ranks(_stripe_window, 2)
    assert all("zigzag" in e and "stripe" in e for e in errors), errors


def _stripe_window(rank, world):
    q = torch.randn(1, 8, 2, 8)
    ring_attention(q, q, q, layout="stripe", span=Span("window", 4), backend="torch")


def test_halo_serves_narrow_windows_only():
    from lsts.parallel.halo import halo_applies

    assert halo_applies(Span("window", 14), "zigzag", 26, 2)  # width 13 = run
    assert not halo_applies(Span("window", 15), "zigzag", 26, 2)
    assert not halo_applies(Span("causal"), "contiguous", 26, 2)
    assert not halo_applies(Span("window", 4), "stripe", 26, 2)


def test_halo_serves_s2_and_sf_whose_reach_fits_a_run():
    from lsts.parallel.halo import halo_applies, halo_width

    # LongLoRA's G = N/4 (N = 1024) on zigzag: a run is N/(2P); shifted half-groups reach G/2 back.
    assert halo_applies(Span("s2", 256), "zigzag", 512, 2)  # run 256: width G/2 = 128
    assert halo_width(Span("s2", 256), "zigzag", 512, 2) == 128
    assert halo_applies(Span("s2", 256), "zigzag", 256, 4)  # run 128: width 128
    assert not halo_applies(Span("s2", 256), "zigzag", 128, 8)  # run 64: groups span 4 runs
    assert halo_applies(Span("sf", 256, 4), "zigzag", 512, 2)
    assert not halo_applies(Span("sf", 16, 20), "zigzag", 32, 2)  # sinks beyond rank 0's first run
    assert not halo_applies(Span("s2", 16), "zigzag", 32, 1)  # one rank: nothing to exchange
    assert not halo_applies(Span("s2", 16), "stripe", 32, 2)
    # Groups of a run's length aligned with the runs: the unshifted heads need no halo at all.
    assert halo_width(Span("s2", 32), "contiguous", 32, 4) == 16
    assert halo_width(Span("block", 32), "contiguous", 32, 4) == 0


@pytest.mark.parametrize("world", [2, 3])
def test_spans_take_the_halo_where_it_fits(world):
    """The oracle cases above exercise both paths: which spans take the halo on each layout."""
    from lsts.parallel.halo import halo_applies

    halo = {
        (layout, name): halo_applies(span, layout, n // world, world)
        for layout in ("zigzag", "contiguous")
        for name in (*SPANS, *ALIGNED)
        for n, span in [_problem(layout, name, world)]
    }
    for name in ("s2-12", "sf-12-sink4", "s2-aligned", "sf-aligned-sink4", "window-9", "block-10", "block-16"):
        assert halo["zigzag", name] and halo["contiguous", name], name
    for name in ("causal", "window-20", "s2-40", "sf-12-sink16"):
        assert not halo["zigzag", name], name
    assert not halo["contiguous", "sf-12-sink16"]


def test_halo_traffic_follows_the_window_not_n():
    sent = [r[0] for r in run_ranks(_count_halo_elements, 2, [(Span("window", 9), 2 * 2 * 64, "zigzag")])]
    # rank 0 of zigzag sends run A's tail to rank 1; rank 1 sends run B's tail back: w - 1 tokens of
    # K and V each way (batch 1, 2 K/V heads, head dim 16), whatever the sequence length.
    per_token = 2 * KV_HEADS * HEAD_DIM
    assert sent == [(8 * per_token, 8 * per_token, 0)] * 2


def test_aligned_s2_sf_traffic_is_half_a_group_and_the_sinks():
    """LongLoRA-aligned S² / SF (G = 64 divides every run) at two sequence lengths: only the shifted
    half-groups that straddle ranks move (G/2 tokens of the shifted heads' K and V per message: one
    K/V head of two), plus SF's sinks once from rank 0, and the same back in the backward; nothing
    goes round the ring."""
    g, n_sink, per_token = 64, 4, 2 * KV_HEADS * HEAD_DIM
    cases = [
        (Span(kind, g, sinks), n, layout)
        for layout in ("zigzag", "contiguous")
        for kind, sinks in (("s2", 0), ("sf", n_sink))
        for n in (2 * 2 * 64, 2 * 2 * 256)
    ]
    sent = run_ranks(_count_halo_elements, 2, cases)
    half = g // 2 * per_token // KV_HEADS  # the shifted query heads (3 of 6) share one K/V head
    sink = n_sink * per_token
    want = {  # (layout, kind): [(forward, backward, ring) per rank]
        ("zigzag", "s2"): [(half, half, 0), (half, half, 0)],
        ("zigzag", "sf"): [(half + sink, half, 0), (half, half + sink, 0)],
        ("contiguous", "s2"): [(half, 0, 0), (0, half, 0)],
        ("contiguous", "sf"): [(half + sink, 0, 0), (0, half + sink, 0)],
    }
    for i, (span, n, layout) in enumerate(cases):
        assert [s[i] for s in sent] == want[layout, span.kind], (span, n, layout)


def _count_halo_elements(rank, world, cases):
    """Per case ``(span, n, layout)``: elements this rank sends in the halo exchange of the forward
    and of the backward, and round the ring."""
    import lsts.parallel.halo as halo
    from lsts.parallel import RingComm

    counts, ring_sent = [], [0]
    real, real_send = halo._exchange, RingComm.send_recv

    def counting(group, outgoing, incoming):
        counts.append(sum(t.numel() for _, t in outgoing))
        real(group, outgoing, incoming)

    def counting_ring(self, tensor):
        ring_sent[0] += tensor.numel()
        return real_send(self, tensor)

    halo._exchange, RingComm.send_recv = counting, counting_ring
    results = []
    try:
        for span, n, layout in cases:
            counts.clear()
            ring_sent[0] = 0
            q = shard_sequence(torch.randn(1, n, HEADS, HEAD_DIM, dtype=torch.float64), layout=layout)
            kv = shard_sequence(torch.randn(1, n, KV_HEADS, HEAD_DIM, dtype=torch.float64), layout=layout)
            q, kv = q.requires_grad_(), kv.requires_grad_()
            out = ring_attention(q, kv, kv, layout=layout, span=span, backend="torch")
            forward = sum(counts)
            out.sum().backward()
            results.append((forward, sum(counts) - forward, ring_sent[0]))
    finally:
        halo._exchange, RingComm.send_recv = real, real_send
    return results


def _hybrid_shifting_spans(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from lsts.parallel import hybrid_attention

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    errs = {}
    for name in ("s2-12", "sf-12-sink4"):
        n, span = 2 * world * CHUNK, SPANS[name]
        g = torch.Generator().manual_seed(7)
        q, dout = (torch.randn(1, n, HEADS + 2, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        local = [shard_sequence(x).requires_grad_() for x in (q, k, v)]
        out = hybrid_attention(*local, mesh=mesh, span=span, backend="torch")
        out.backward(shard_sequence(dout))
        got = [gather_sequence(x.detach()) for x in (out, *(x.grad for x in local))]
        want = oracle_masked(q, k, v, dout, span, 0, 0, [0, n])
        errs[name] = max(rel_err(a, b) for a, b in zip(got, (want[0], *want[2:])))
    return errs


def test_hybrid_takes_shifting_spans():
    """Ulysses (2) × ring (2) with S² and SF: 8 heads, so each Ulysses rank holds one kind."""
    for rank, errs in enumerate(run_ranks(_hybrid_shifting_spans, 4)):
        assert max(errs.values()) <= 1e-10, (rank, errs)


def _hybrid_cases(rank, world):
    """The hybrid both ways on 2 ranks (Ulysses over both with a ring of one, and the reverse), with
    packed documents and spans, out and lse included."""
    import torch.distributed as dist

    whole, single = dist.new_group([0, 1]), [dist.new_group([r]) for r in range(2)][rank]
    splits = {"u2r1": (single, whole), "u1r2": (whole, single)}
    results = {}
    for split, (ring_group, ulysses_group) in splits.items():
        fn = functools.partial(hybrid_attention, ring_group=ring_group, ulysses_group=ulysses_group)
        for layout in ("zigzag", "contiguous"):
            for span_name in ("causal", "window-9", "sf-12-sink4"):
                n, span = _problem(layout, span_name, world)
                errs = _case_errors(fn, layout, n, span, _documents(n), len(results))
                results[f"{split}-{layout}-{span_name}"] = errs
    return results


def test_hybrid_with_documents_and_lse_matches_oracle():
    for rank, results in enumerate(run_ranks(_hybrid_cases, 2)):
        assert len(results) == 12
        bad = {case: errs for case, errs in results.items() if not max(errs.values()) <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"
