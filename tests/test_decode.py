"""Split-K decoding (`lsts.inference.split_k_attention`) against explicit float64 attention, in one
process and with the KV cache sharded over gloo ranks."""

import pytest
import torch

from lsts.inference import split_bounds, split_k_attention
from lsts.kernels.attention import reference
from tests.distributed import run_ranks
from tests.oracle import rel_err


def _qkv(sk, sq, h=4, h_kv=2, d=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, sq, h, d, generator=g, dtype=dtype)
    k, v = (torch.randn(2, sk, h_kv, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _oracle(q, k, v):
    """Queries at the last positions of the keys: the causal mask with its diagonal at the end."""
    sq, sk = q.shape[1], k.shape[1]
    keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    return reference.attention_fwd(q.double(), k.double(), v.double(), q.shape[-1] ** -0.5, mask=keep)


@pytest.mark.parametrize("n_splits", [1, 3, 7])
@pytest.mark.parametrize("sq", [1, 4], ids=["one-query", "four-queries"])
@pytest.mark.parametrize("sk", [61, 8], ids=["odd-cache", "short-cache"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_split_k_equals_full_attention(n_splits, sq, sk, backend):
    q, k, v = _qkv(sk, sq)
    out, lse = split_k_attention(q, k, v, n_splits, backend=backend)
    want_out, want_lse = _oracle(q, k, v)
    assert rel_err(out, want_out) < 1e-12 and rel_err(lse, want_lse) < 1e-12


def test_split_k_in_float32_and_without_gqa():
    q, k, v = _qkv(45, 3, h=3, h_kv=3, d=60, dtype=torch.float32)
    out, lse = split_k_attention(q, k, v, 4, softmax_scale=0.2, backend="torch")
    want_out, want_lse = reference.attention_fwd(
        q.double(), k.double(), v.double(), 0.2, mask=torch.arange(45)[None, :] <= torch.arange(3)[:, None] + 42
    )
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert rel_err(out, want_out) < 1e-5 and rel_err(lse, want_lse) < 1e-5


def test_bf16_parts_are_merged_before_rounding():
    """Each unit's partial output stays float32 until the merged result is rounded once: in bf16 the
    error against float64 does not grow with the number of units (rounded parts grew it 26-33%)."""
    q, k, v = _qkv(256, 4, h=8, h_kv=2, d=32, dtype=torch.bfloat16)
    want, _ = _oracle(q, k, v)
    errors = [rel_err(split_k_attention(q, k, v, n, backend="torch")[0], want) for n in (1, 4, 16)]
    assert max(errors) <= 1.02 * errors[0], errors


def test_work_units_are_equal_but_the_last():
    assert split_bounds(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert split_bounds(10, 7) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # ceil(10/7) = 2 keys per unit
    assert split_bounds(2, 5) == [(0, 1), (1, 2)]
    assert split_bounds(0, 3) == []
    with pytest.raises(ValueError, match="n_splits"):
        split_bounds(4, 0)


def test_more_queries_than_keys_is_an_error():
    q, k, v = _qkv(3, 4)
    with pytest.raises(ValueError, match="4 queries but only 3 keys"):
        split_k_attention(q, k, v, 2)


def test_no_autograd_graph():
    q, k, v = (x.requires_grad_() for x in _qkv(20, 2))
    out, _ = split_k_attention(q, k, v, 3, backend="torch")
    assert not out.requires_grad


# Named shardings of the cache, by world size; each spawn runs all of its world's cases (spawns are slow).
SHARDINGS = {
    2: {"uneven": [31, 30], "the last rank holds fewer keys than the queries": [40, 2]},
    3: {"a shard of one key": [20, 1, 19], "an empty shard": [0, 25, 12]},
}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_cache_equals_one_process(world):
    cases = [(name, lengths, sq) for name, lengths in SHARDINGS[world].items() for sq in (1, 4)]
    got = run_ranks(_sharded_decode, world, cases)
    for i, (name, lengths, sq) in enumerate(cases):
        q, k, v = _qkv(sum(lengths), sq)
        want_out, want_lse = split_k_attention(q, k, v, 3, backend="torch")
        for rank in range(world):
            out, lse = (torch.from_numpy(x) for x in got[rank][i])
            assert rel_err(out, want_out) < 1e-12 and rel_err(lse, want_lse) < 1e-12, (name, sq, rank)
            assert torch.equal(out, torch.from_numpy(got[0][i][0])), f"{name}: ranks disagree"


def _sharded_decode(rank, world, cases):
    import torch.distributed as dist

    results = []
    for _, lengths, sq in cases:
        q, k, v = _qkv(sum(lengths), sq)
        lo = sum(lengths[:rank])
        shard = slice(lo, lo + lengths[rank])
        out, lse = split_k_attention(q, k[:, shard], v[:, shard], 2, group=dist.group.WORLD, backend="torch")
        results.append((out.numpy(), lse.numpy()))
    return results
