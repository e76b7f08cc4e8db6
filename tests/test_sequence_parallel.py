"""Every sequence-parallel attention against the float64 single-process oracle on 1-4 gloo ranks:
out, lse, dq, dk, dv; causal and not; H_kv in {H, H/2, 1}; odd chunk lengths (37 tokens) and a head
dim of 20. One spawn per world size runs all cases; the test then asserts each case by name."""

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lsts.kernels.attention import Span
from lsts.parallel import (
    RingComm,
    gather_sequence,
    hybrid_attention,
    ring_attention,
    rsa_attention,
    shard_sequence,
    ulysses_attention,
)
from tests.distributed import run_ranks
from tests.oracle import full_attention, rel_err

BATCH, HEADS, HEAD_DIM, CHUNK = 2, 12, 20, 37
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
LAYOUTS = ("contiguous", "zigzag", "stripe")


def _inputs(world, layout, hkv, dtype, causal):
    n = (2 if layout == "zigzag" else 1) * CHUNK * world
    # A seed per case from its parameters (not hash(): strings hash differently in every process).
    seed = 1000 * world + 100 * LAYOUTS.index(layout) + 10 * int(causal) + hkv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, n, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    k, v = (torch.randn(BATCH, n, hkv, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(BATCH, n, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _run_case(fn, layout, causal, hkv, dtype, world, group=None):
    """Shard, run ``fn`` forward and backward, gather; return relative errors by tensor name."""
    q, k, v, dout = _inputs(world, layout, hkv, dtype, causal)
    local = [shard_sequence(x.to(dtype), group, layout=layout).requires_grad_() for x in (q, k, v)]
    out, lse = fn(*local, causal=causal, layout=layout)
    out.backward(shard_sequence(dout.to(dtype), group, layout=layout))
    gather = lambda x: gather_sequence(x.detach(), group, layout=layout)  # noqa: E731
    got = [gather(out), gather(lse.transpose(1, 2).contiguous()).transpose(1, 2)]
    got += [gather(x.grad) for x in local]
    want = full_attention(q, k, v, dout, causal)
    return {name: rel_err(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want)}


def _with_span(fn, **fixed):
    """``fn``, an internal entry point (rsa, hybrid: they take a span, not FlashAttention's flag),
    called as the cases call the public ring and Ulysses functions: with ``causal=``."""
    return lambda q, k, v, causal, **kw: fn(q, k, v, span=Span("causal") if causal else Span("full"), **fixed, **kw)


def _methods(world, mesh_groups):
    """name -> (attention fn taking (q, k, v, causal, layout), layouts it supports): the public ring
    and Ulysses functions take ``causal=`` as documented, the others a span."""
    methods = {
        "ring": (
            lambda q, k, v, **kw: ring_attention(q, k, v, return_lse=True, **kw),
            ("contiguous", "zigzag", "stripe"),
        ),
        "ulysses": (
            lambda q, k, v, **kw: ulysses_attention(q, k, v, return_lse=True, **kw),
            ("contiguous", "zigzag", "stripe"),
        ),
        "rsa": (
            _with_span(lambda q, k, v, layout, **kw: rsa_attention(q, k, v, return_lse=True, **kw)),
            ("contiguous",),
        ),
    }
    for name, (ring_group, uly_group, mesh) in mesh_groups.items():
        kw = {"mesh": mesh} if mesh is not None else {"ring_group": ring_group, "ulysses_group": uly_group}
        methods[name] = (
            _with_span(hybrid_attention, return_lse=True, **kw),
            ("contiguous", "zigzag"),
        )
    return methods


def _hybrid_groups(rank, world):
    """(ring, ulysses) splits to test: explicit groups for world 2, a 2x2 DeviceMesh for world 4."""
    if world == 2:
        whole = dist.new_group([0, 1])
        singles = [dist.new_group([r]) for r in range(2)]
        return {"hybrid-u2r1": (singles[rank], whole, None), "hybrid-u1r2": (whole, singles[rank], None)}
    if world == 4:
        return {"hybrid-u2r2-mesh": (None, None, init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses")))}
    return {}


def _all_cases(rank, world):
    torch.manual_seed(0)
    results = {}
    methods = _methods(world, _hybrid_groups(rank, world))
    for name, (fn, layouts) in methods.items():
        for layout, causal, hkv, dtype in itertools.product(layouts, (True, False), (HEADS, HEADS // 2, 1), TOL):
            case = f"{name}-{layout}-{'causal' if causal else 'full'}-kv{hkv}-{str(dtype)[6:]}"
            results[case] = _run_case(fn, layout, causal, hkv, dtype, world)
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sequence_parallel_attention_equals_full_attention(world):
    results = run_ranks(_all_cases, world)[0]
    failures = []
    for case, errs in results.items():
        tol = TOL[torch.float64] if case.endswith("float64") else TOL[torch.float32]
        failures += [f"{case} {name}: {err:.2e} > {tol:.0e}" for name, err in errs.items() if not err <= tol]
    assert len(results) >= 24
    assert not failures, "\n".join(failures)


def _messages_and_errors(rank, world):
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 4 * world, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    local = [shard_sequence(x) for x in (q, k, v)]
    counts = []
    real_send_recv = RingComm.send_recv

    def counting(self, tensor):
        counts.append(tensor.numel())
        return real_send_recv(self, tensor)

    RingComm.send_recv = counting
    try:
        out, lse = ring_attention(*local, return_lse=True)
    finally:
        RingComm.send_recv = real_send_recv
    want_out, want_lse, *_ = full_attention(q, k, v, torch.zeros_like(q), causal=True)
    got_lse = gather_sequence(lse.transpose(1, 2).contiguous()).transpose(1, 2)
    return len(counts), max(rel_err(gather_sequence(out), want_out), rel_err(got_lse, want_lse))


@pytest.mark.parametrize("world", [1, 3])
def test_ring_sends_p_minus_1_messages_and_matches_the_oracle(world):
    """World 1 included: the ring with nobody to talk to is checked against the explicit oracle, not
    against the local kernel it calls."""
    for messages, err in run_ranks(_messages_and_errors, world):
        assert messages == world - 1
        assert err <= 1e-10, err


def _round_trip(rank, world):
    x = torch.randn(3, 2 * world * 5, 4, generator=torch.Generator().manual_seed(7))
    ok = {}
    for layout in ("contiguous", "zigzag", "stripe"):
        local = shard_sequence(x, layout=layout).requires_grad_()
        full = gather_sequence(local, layout=layout)
        weight = torch.arange(full.numel(), dtype=full.dtype).view_as(full)
        (full * weight).sum().backward()
        ok[layout] = torch.equal(full, x) and torch.equal(local.grad, shard_sequence(weight, layout=layout))
    return ok


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gather_of_shard_is_identity_and_backward_returns_the_shard(world):
    for ok in run_ranks(_round_trip, world):
        assert ok == {"contiguous": True, "zigzag": True, "stripe": True}


def _low_precision_and_large(rank, world, dtype, n, heads, head_dim):
    """Ring (every layout), Ulysses and the hybrid on ``dtype`` inputs against the float64 oracle."""
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, n, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(4))
    want = full_attention(q, k, v, dout, causal=True)
    mesh = init_device_mesh("cpu", (world // 2, 2)) if world % 2 == 0 else None
    methods = {f"ring-{layout}": (ring_attention, layout) for layout in ("zigzag", "contiguous", "stripe")}
    methods["ulysses"] = (ulysses_attention, "zigzag")
    if mesh is not None:
        methods["hybrid"] = (_with_span(hybrid_attention, mesh=mesh), "zigzag")
    errors = {}
    for name, (fn, layout) in methods.items():
        local = [shard_sequence(x.to(dtype), layout=layout).requires_grad_() for x in (q, k, v)]
        out = fn(*local, causal=True, layout=layout)
        out.backward(shard_sequence(dout.to(dtype), layout=layout))
        got = [gather_sequence(x.detach(), layout=layout) for x in (out, *(t.grad for t in local))]
        errors[name] = max(rel_err(a, b) for a, b in zip(got, (want[0], *want[2:])))
    return errors


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 in, bf16 out: the error is bf16 rounding (~1e-2), not an fp16/bf16 accumulation drift."""
    errors = run_ranks(_low_precision_and_large, 2, torch.bfloat16, 256, 4, 32)[0]
    assert set(errors) == {"ring-zigzag", "ring-contiguous", "ring-stripe", "ulysses", "hybrid"}
    assert all(err < 3e-2 for err in errors.values()), errors


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_large_fp32_parity(world):
    errors = run_ranks(_low_precision_and_large, world, torch.float32, 4096, 8, 64)[0]
    assert all(err <= 1e-5 for err in errors.values()), errors
