"""Ring attention with spans (window, block, LongLoRA S², SinkLoRA SF) and packed documents against
the float64 single-process oracle with the mask written out, on 2 and 3 gloo ranks, zigzag and
contiguous layouts: out, lse, dq, dk, dv. Ulysses takes the spans that do not shift heads. One
spawn per world size runs every case."""

import pytest
import torch

from lsts.kernels.attention import Span
from lsts.parallel import gather_sequence, ring_attention, shard_sequence, ulysses_attention
from lsts.parallel.sharding import tiles
from tests.distributed import errors_on_all_ranks, run_ranks
from tests.oracle import rel_err
from tests.test_varlen_attention import oracle_masked

CHUNK, HEADS, KV_HEADS, HEAD_DIM = 13, 6, 2, 16
SPANS = {
    "causal": Span("causal"),
    "window-9": Span("window", 9),  # narrower than a run (13): the halo exchange
    "window-20": Span("window", 20),  # wider: the ring, visiting only reachable runs
    "block-10": Span("block", 10),
    "block-16": Span("block", 16),
    "s2-12": Span("s2", 12),
    "sf-12-sink4": Span("sf", 12, 4),
}


def _documents(n):
    """Odd boundaries, one straddling every rank boundary of both layouts on 2 and 3 ranks."""
    return [0, 3, n // 3 + 1, n // 2 + 2, n - 5, n]


METHODS = {"ring": ring_attention, "ulysses": ulysses_attention}
CASES = [
    (method, layout, span, docs)
    for method in METHODS
    for layout in ("zigzag", "contiguous")
    for span in SPANS
    for docs in (False, True)
    if method == "ring" or not SPANS[span].shifts_heads
]


def _all_cases(rank, world):
    results = {}
    for method, layout, span_name, with_docs in CASES:
        n = (2 if layout == "zigzag" else 1) * CHUNK * world
        g = torch.Generator().manual_seed(len(results))
        q, dout = (torch.randn(1, n, HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        span, cu = SPANS[span_name], (_documents(n) if with_docs else None)
        local = [shard_sequence(x, layout=layout).requires_grad_() for x in (q, k, v)]
        fn = METHODS[method]
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
        results[(method, layout, span_name, with_docs)] = errs
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


def test_ulysses_rejects_head_shifting_spans():
    errors = errors_on_all_ranks(_ulysses_s2, 2)
    assert all("ring attention" in e and "'s2'" in e for e in errors), errors


def _ulysses_s2(rank, world):
    q = torch.randn(1, 8, 2, 8)
    ulysses_attention(q, q, q, span=Span("s2", 4), backend="torch")


def test_halo_serves_narrow_windows_only():
    from lsts.parallel.halo import halo_applies

    assert halo_applies(Span("window", 14), "zigzag", 26, 2)  # width 13 = run
    assert not halo_applies(Span("window", 15), "zigzag", 26, 2)
    assert not halo_applies(Span("causal"), "contiguous", 26, 2)
    assert not halo_applies(Span("window", 4), "stripe", 26, 2)


def test_halo_traffic_follows_the_window_not_n():
    sent = run_ranks(_count_halo_elements, 2)
    # rank 0 of zigzag sends run A's tail to rank 1; rank 1 sends run B's tail back: w - 1 tokens of
    # K and V each way (batch 1, 2 K/V heads, head dim 16), whatever the sequence length.
    per_token = 2 * KV_HEADS * HEAD_DIM
    assert sent == [(8 * per_token, 8 * per_token)] * 2


def _count_halo_elements(rank, world):
    import lsts.parallel.halo as halo

    counts, real = [], halo._exchange

    def counting(group, outgoing, incoming):
        counts.append(sum(t.numel() for _, t in outgoing))
        real(group, outgoing, incoming)

    halo._exchange = counting
    try:
        n = 2 * world * 64
        x = torch.randn(1, n, KV_HEADS, HEAD_DIM, dtype=torch.float64)
        local = shard_sequence(x, layout="zigzag").requires_grad_()
        ring_attention(local, local, local, span=Span("window", 9), backend="torch").sum().backward()
    finally:
        halo._exchange = real
    return tuple(counts)  # (forward, backward)
