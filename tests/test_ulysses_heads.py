"""Ulysses and hybrid attention with head counts that the Ulysses degree does not divide (uneven head
splits, K/V heads sent to every rank whose query heads use them) against the float64 oracle: out, lse,
dq, dk, dv (and dsinks), on 2 and 3 gloo ranks. One spawn per world size runs every case."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lsts.kernels.attention import Span
from lsts.parallel import gather_sequence, hybrid_attention, shard_sequence, ulysses_attention
from lsts.parallel.comm import even_split
from lsts.parallel.ulysses import head_slice, kv_heads_of_rank
from tests.distributed import errors_on_all_ranks, run_ranks
from tests.test_softcap_sinks import errors, oracle

CHUNK, HEAD_DIM = 5, 8
SPANS = {"causal": Span("causal"), "s2-6": Span("s2", 6), "sf-6-sink2": Span("sf", 6, 2)}
# (method, query heads, key/value heads, span, with documents, with sinks and softcap)
CASES = [
    *[("ulysses", h, kv, "causal", False, False) for h, kv in ((6, 6), (6, 3), (6, 2), (6, 1), (7, 7), (7, 1))],
    ("ulysses", 7, 1, "causal", True, False),
    ("ulysses", 7, 7, "s2-6", False, False),  # the shifted half starts inside a rank's slice
    ("ulysses", 6, 2, "sf-6-sink2", True, True),
    ("ulysses", 28, 4, "causal", False, False),
    ("hybrid", 7, 1, "causal", True, False),
    ("hybrid", 6, 2, "sf-6-sink2", False, True),
]


SPLITS = [(w, h, kv) for w in (2, 3, 4, 8) for h, kv in ((6, 6), (6, 2), (7, 1), (28, 4), (28, 28), (8, 2)) if h >= w]


@pytest.mark.parametrize("world,heads,kv", SPLITS)
def test_head_split_covers_every_head_with_its_own_kv_head(world, heads, kv):
    slices = [head_slice(heads, r, world) for r in range(world)]
    assert [s.stop - s.start for s in slices] == even_split(heads, world)
    assert slices[0].start == 0 and slices[-1].stop == heads
    for r, s in enumerate(slices):
        kv_heads = kv_heads_of_rank(heads, kv, r, world)
        ratio = (s.stop - s.start) // len(kv_heads)
        assert ratio * len(kv_heads) == s.stop - s.start
        for i, h in enumerate(range(s.start, s.stop)):  # local GQA: head i uses local K/V head i // ratio
            assert kv_heads[i // ratio] == h // (heads // kv), (r, h)


def _method(name, world):
    if name == "ulysses":
        return ulysses_attention
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    return lambda *a, **kw: hybrid_attention(*a, mesh=mesh, **kw)


def _all_cases(rank, world):
    results = {}
    for method, heads, kv, span_name, with_docs, with_sinks in CASES:
        n = 2 * CHUNK * world
        cu = [0, 3, n // 3 + 1, n - 4, n] if with_docs else None
        g = torch.Generator().manual_seed(len(results))
        q, dout = (torch.randn(1, n, heads, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(1, n, kv, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        sinks = torch.randn(heads, generator=g, dtype=torch.float64) if with_sinks else None
        softcap = 1.5 if with_sinks else 0.0
        local = [shard_sequence(x).requires_grad_() for x in (q, k, v)]
        local_sinks = None if sinks is None else sinks.clone().requires_grad_()
        out, lse = _method(method, world)(
            *local, span=SPANS[span_name], cu_seqlens=cu, return_lse=True, backend="torch", softcap=softcap,
            sinks=local_sinks,
        )  # fmt: skip
        out.backward(shard_sequence(dout))
        got = [gather_sequence(x.detach()) for x in (out, lse.transpose(1, 2).contiguous(), *(x.grad for x in local))]
        got[1] = got[1].transpose(1, 2)
        if local_sinks is not None:
            dist.all_reduce(local_sinks.grad)  # each rank holds its heads' part
        got.append(None if local_sinks is None else local_sinks.grad)
        want = oracle(q, k, v, sinks, dout, SPANS[span_name], softcap, cu)
        results[(method, heads, kv, span_name, with_docs, with_sinks)] = errors(got, want)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_results(request):
    return run_ranks(_all_cases, request.param)


def _case_id(case) -> str:
    return "-".join(str(x) for x in case[:4]) + "-docs" * case[4] + "-sinks" * case[5]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_uneven_heads_match_the_oracle(world_results, case):
    for rank, results in enumerate(world_results):
        errs = results[case]
        assert max(errs.values()) <= 1e-10, f"rank {rank}: {errs}"


def test_fewer_heads_than_ranks_is_a_clear_error():
    errors_ = errors_on_all_ranks(_one_head_on_two_ranks, 2)
    assert all("needs at least 2 heads" in e for e in errors_), errors_


def _one_head_on_two_ranks(rank, world):
    q = torch.randn(1, 4, 1, 8)
    ulysses_attention(q, q, q, backend="torch")
