"""Bad input raises a `ValueError` naming the value and the fix on *every* rank, before any data
moves: no hang, no silently wrong output. Each scenario runs on real gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from lsts.kernels.attention import Span
from lsts.parallel import hybrid_attention, ring_attention, rsa_attention, shard_sequence, ulysses_attention
from tests.distributed import errors_on_all_ranks


def _qkv(s=8, h=4, hkv=4, d=8, dtype=torch.float32):
    return (
        torch.randn(1, s, h, d, dtype=dtype),
        torch.randn(1, s, hkv, d, dtype=dtype),
        torch.randn(1, s, hkv, d, dtype=dtype),
    )


def _zigzag_odd_length(rank, world):
    ring_attention(*_qkv(s=5), layout="zigzag")  # N = 10 over 2 ranks needs a multiple of 4


def _length_differs(rank, world):
    ring_attention(*_qkv(s=8 if rank == 0 else 6))


def _dtype_differs(rank, world):
    ring_attention(*_qkv(dtype=torch.float32 if rank == 0 else torch.float64))


def _kv_heads_differ(rank, world):
    ulysses_attention(*_qkv(hkv=4 if rank == 0 else 2))


def _heads_not_divisible_on_one_rank(rank, world):
    ring_attention(*_qkv(h=4, hkv=4 if rank == 0 else 3))


def _ulysses_fewer_heads_than_ranks(rank, world):
    ulysses_attention(*_qkv(h=1, hkv=1))


def _hybrid_stripe(rank, world):
    g = dist.new_group([0, 1])
    hybrid_attention(*_qkv(), ring_group=dist.new_group([rank]), ulysses_group=g, layout="stripe")


def _shard_bad_length(rank, world):
    shard_sequence(torch.randn(1, 10, 2), layout="zigzag")


def _unknown_layout(rank, world):
    ring_attention(*_qkv(), layout="spiral")


def _rsa_length_differs(rank, world):
    rsa_attention(*_qkv(s=7 if rank == 0 else 5))


def _rsa_window_on_one_rank(rank, world):
    rsa_attention(*_qkv(), span=Span("window", 3) if rank else Span("causal"))


CASES = [
    pytest.param(_zigzag_odd_length, 2, ["must be a multiple of 4"] * 2, id="zigzag-length-not-multiple-of-2P"),
    pytest.param(
        _length_differs,
        2,
        ["local sequence length must be the same on every rank of the group; got rank 0: 8, rank 1: 6"] * 2,
        id="length-differs-across-ranks",
    ),
    pytest.param(
        _dtype_differs,
        2,
        ["dtype must be the same on every rank of the group; got rank 0: torch.float32, rank 1: torch.float64"] * 2,
        id="dtype-differs-across-ranks",
    ),
    pytest.param(
        _kv_heads_differ,
        2,
        ["key/value heads must be the same on every rank of the group; got rank 0: 4, rank 1: 2"] * 2,
        id="kv-heads-differ-across-ranks",
    ),
    pytest.param(
        _heads_not_divisible_on_one_rank,
        2,
        ["invalid attention inputs on rank(s) [1]", "query heads (4) must be a multiple of key/value heads (3)"],
        id="bad-heads-on-one-rank-only",
    ),
    pytest.param(
        _ulysses_fewer_heads_than_ranks, 2, ["it needs at least 2 heads"] * 2, id="ulysses-fewer-heads-than-ranks"
    ),
    pytest.param(_hybrid_stripe, 2, ["hybrid attention supports the layouts"] * 2, id="hybrid-with-stripe-layout"),
    pytest.param(
        _shard_bad_length,
        3,
        ["sequence length 10 cannot be split by layout 'zigzag' over 3 ranks"] * 3,
        id="shard-length-not-divisible",
    ),
    pytest.param(_unknown_layout, 2, ["unknown sequence layout 'spiral'"] * 2, id="unknown-layout"),
    pytest.param(_rsa_length_differs, 2, ["local sequence length must be the same"] * 2, id="rsa-length-differs"),
    pytest.param(
        _rsa_window_on_one_rank,
        2,
        ["invalid attention inputs on rank(s) [1]", "rsa_attention computes the causal and full spans only"],
        id="rsa-window-span",
    ),
]


@pytest.mark.parametrize("fn,world,expected", CASES)
def test_bad_input_raises_on_every_rank(fn, world, expected):
    messages = errors_on_all_ranks(fn, world)
    assert len(messages) == world
    for rank, (msg, want) in enumerate(zip(messages, expected)):
        assert want in msg, f"rank {rank}: {msg!r}"
