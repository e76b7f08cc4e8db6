"""Span masks equal the formulas of docs/algorithms.md, written out element by element."""

import pytest
import torch

from lsts.kernels.attention.spans import Span


def _written_out(kind, n, n_heads, size=0, n_sink=0):
    m = torch.zeros(n_heads, n, n, dtype=torch.bool)
    g = size
    for h in range(n_heads):
        for i in range(n):
            for j in range(n):
                if kind == "full":
                    m[h, i, j] = True
                elif kind == "causal":
                    m[h, i, j] = j <= i
                elif kind == "window":
                    m[h, i, j] = i - size < j <= i
                elif kind == "block":
                    m[h, i, j] = i // size == j // size and j <= i
                elif kind in ("s2", "sf"):
                    shifted = h >= n_heads // 2
                    same = (i + g // 2) // g == (j + g // 2) // g if shifted else i // g == j // g
                    m[h, i, j] = (same or j < n_sink) and j <= i
    return m


@pytest.mark.parametrize(
    "kind,size,n_sink",
    [("full", 0, 0), ("causal", 0, 0), ("window", 5, 0), ("block", 6, 0), ("s2", 8, 0), ("sf", 8, 4), ("sf", 6, 1)],
)
def test_mask_equals_the_written_out_formula(kind, size, n_sink):
    n, h = 29, 4
    pos = torch.arange(n)
    got = Span(kind, size, n_sink).mask(pos, pos, n_heads=h).expand(h, n, n)
    assert torch.equal(got, _written_out(kind, n, h, size, n_sink))


def test_sf_without_sinks_is_s2_and_every_query_sees_the_sinks():
    pos = torch.arange(40)
    assert torch.equal(Span("sf", 8, 0).mask(pos, pos, 4), Span("s2", 8).mask(pos, pos, 4))
    sf = Span("sf", 8, 4).mask(pos, pos, 4)
    for i in range(40):
        assert sf[:, i, : min(i + 1, 4)].all()  # the sinks, causally
        assert not sf[:, i, i + 1 :].any()  # no future token


def test_shifted_heads_have_no_wraparound_leak():
    """The leak-free default: no query sees a later position (the roll variant does)."""
    pos = torch.arange(32)
    m = Span("s2", 8).mask(pos, pos, 2)
    assert not torch.triu(m[1], diagonal=1).any()
    assert m[1, 3, :4].all() and not m[1, 4, :4].any()  # [0, G/2) is a group of its own


@pytest.mark.parametrize("span", [Span("window", 7), Span("block", 5), Span("s2", 6), Span("sf", 6, 2), Span("causal")])
def test_key_and_query_ranges_bound_the_mask(span):
    n, h = 37, 2
    pos = torch.arange(n)
    mask = span.mask(pos, pos, h).expand(h, n, n)
    for head in range(h):
        shift = span.shift(head, h)
        for first in range(0, n, 4):
            last = min(first + 3, n - 1)
            lo, hi = span.key_range(first, last, shift)
            seen = mask[head, first : last + 1].any(0).nonzero().flatten()
            outside = seen[(seen < lo) | (seen >= hi)]
            assert (outside < span.n_sink).all(), (head, first, outside)


@pytest.mark.parametrize(
    "args,match",
    [
        (("spiral",), "unknown attention span"),
        (("window", 0), "positive size"),
        (("s2", 7), "must be even"),
        (("block", 4, 2), "sink tokens"),
    ],
)
def test_bad_span_names_the_problem(args, match):
    with pytest.raises(ValueError, match=match):
        Span(*args)
