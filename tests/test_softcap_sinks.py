"""Logit softcapping (Gemma2) and learnable attention sinks (gpt-oss) on every backend and every
sequence-parallel method, against a float64 oracle written out here: scores ``c·tanh(s/c)``, the
span and document mask, one extra column per head holding the sink logit (value zero), explicit
softmax, autograd for dq, dk, dv and dsinks. GQA (4 query / 2 K/V heads), odd lengths."""

import pytest
import torch

from lsts.kernels.attention import Span, attention
from lsts.kernels.backend import HAS_TRITON, triton_interpreting
from tests.oracle import rel_err

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")
SPANS = {"causal": Span("causal"), "window-5": Span("window", 5), "full": Span("full")}
CAN_TRITON = HAS_TRITON and (torch.cuda.is_available() or triton_interpreting())


def oracle(q, k, v, sinks, dout, span, softcap, cu=None, q_offset=0, k_offset=0):
    """``out, lse, dq, dk, dv, dsinks`` in float64 (``dsinks`` None without sinks)."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    sinks = None if sinks is None else sinks.detach().double().requires_grad_()
    group = q.shape[2] // k.shape[2]
    kx, vx = (x.repeat_interleave(group, dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, kx) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    q_pos, k_pos = torch.arange(q.shape[1]) + q_offset, torch.arange(k.shape[1]) + k_offset
    keep = span.mask(q_pos, k_pos, q.shape[2])[None]
    if cu is not None:
        doc = torch.bucketize(torch.arange(cu[-1]), torch.tensor(cu[1:]), right=True)
        keep = keep & (doc[q_pos][:, None] == doc[k_pos][None, :])
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
        vx = torch.cat([vx, vx.new_zeros(vx.shape[0], 1, *vx.shape[2:])], dim=1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without any key (no sink): zero
    out = torch.einsum("bhqk,bkhd->bqhd", p, vx)
    inputs = (q, k, v) if sinks is None else (q, k, v, sinks)
    grads = torch.autograd.grad(out, inputs, dout.double())
    return [out.detach(), lse.detach(), *grads, *([None] if sinks is None else [])]


def inputs(n, seed=0, batch=2, sinks=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, dout = (2 * torch.randn(batch, n, HEADS, HEAD_DIM, generator=g, dtype=dtype) for _ in range(2))
    k, v = (2 * torch.randn(batch, n, KV_HEADS, HEAD_DIM, generator=g, dtype=dtype) for _ in range(2))
    s = torch.randn(HEADS, generator=g, dtype=dtype) if sinks else None
    return q, k, v, s, dout


def errors(got, want) -> dict[str, float]:
    """Relative error per tensor on the finite entries; inf where finiteness or presence differ."""
    errs = {}
    for name, a, b in zip(NAMES, got, want):
        if a is None or b is None:
            errs[name] = 0.0 if a is None and b is None else float("inf")
            continue
        a, finite = a.detach().cpu(), torch.isfinite(b)
        same = torch.equal(torch.isfinite(a), finite) and not a.isnan().any()
        errs[name] = (rel_err(a[finite], b[finite]) if finite.any() else 0.0) if same else float("inf")
    return errs


def run_local(backend, q, k, v, sinks, dout, span, softcap, cu=None, q_offset=0, k_offset=0, device="cpu"):
    q, k, v = (x.to(device).clone().requires_grad_() for x in (q, k, v))
    sinks = None if sinks is None else sinks.to(device).clone().requires_grad_()
    out, lse = attention(
        q, k, v, span=span, backend=backend, softcap=softcap, sinks=sinks, cu_seqlens=cu,
        q_offset=q_offset, k_offset=k_offset,
    )  # fmt: skip
    out.backward(dout.to(device, q.dtype))
    return [out, lse, q.grad, k.grad, v.grad, None if sinks is None else sinks.grad]


LOCAL_CASES = [  # (span, softcap, sinks, packed documents)
    (span, softcap, sinks, cu)
    for span in SPANS
    for softcap, sinks in ((2.0, False), (0.0, True), (1.5, True))
    for cu in (None, [0, 11, 12, 37])
]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", LOCAL_CASES, ids=lambda c: f"{c[0]}-cap{c[1]}-sinks{c[2]}{'-docs' if c[3] else ''}")
def test_local_float64(backend, case):
    span, softcap, with_sinks, cu = case
    q, k, v, sinks, dout = inputs(37, sinks=with_sinks)
    got = run_local(backend, q, k, v, sinks, dout, SPANS[span], softcap, cu)
    want = oracle(q, k, v, sinks, dout, SPANS[span], softcap, cu)
    errs = errors(got, want)
    assert max(errs.values()) <= 1e-10, errs


def test_blocks_at_offsets_with_rows_that_see_no_key():
    """Queries 30..45 against keys 0..19, window 12: the last queries see no key (out 0, lse = sink)."""
    q, k, v, sinks, dout = inputs(20, seed=3)
    q, dout = q[:, :16], dout[:, :16]
    span = Span("window", 12)
    for backend in ("reference", "torch"):
        got = run_local(backend, q, k, v, sinks, dout, span, 3.0, q_offset=30)
        want = oracle(q, k, v, sinks, dout, span, 3.0, q_offset=30)
        assert max(errors(got, want).values()) <= 1e-10, backend
        assert (got[0][:, -1] == 0).all() and torch.equal(got[1][:, :, -1], sinks.expand(2, -1))


@pytest.mark.skipif(not CAN_TRITON, reason="needs triton with CUDA, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 5e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "span,softcap,cu",
    [("causal", 1.5, None), ("window-5", 2.0, [0, 11, 12, 37]), ("full", 0.0, None)],
    ids=["causal-cap", "window-cap-docs", "full-sinks-only"],
)
def test_triton(span, softcap, cu, dtype, tol):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, sinks, dout = inputs(37, batch=1)
    q, k, v, dout = (x.to(dtype) for x in (q, k, v, dout))
    got = run_local("triton", q, k, v, sinks.float(), dout, SPANS[span], softcap, cu, device=device)
    want = oracle(q, k, v, sinks.float(), dout, SPANS[span], softcap, cu)
    errs = errors(got, want)
    assert max(errs.values()) <= tol, errs


@pytest.mark.parametrize(
    "softcap,sinks,match",
    [
        (-1.0, None, "softcap must be finite and >= 0"),
        (float("inf"), None, "softcap must be finite and >= 0"),
        (torch.tensor(2.0), None, "softcap must be a float"),
        (0.0, torch.zeros(3), "one logit per query head"),
        (0.0, torch.zeros(1, 4), "one logit per query head"),
        (0.0, torch.zeros(4, dtype=torch.int64), "sinks must be a floating-point tensor"),
        (0.0, torch.zeros(4, device="meta"), "sinks must be on q's device"),
    ],
)
def test_bad_softcap_or_sinks_is_a_clear_error(softcap, sinks, match):
    q, k, v, _, _ = inputs(8, sinks=False)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, backend="torch", softcap=softcap, sinks=sinks)


# --- sequence parallelism: ring (and its halo path), Ulysses, hybrid ---------------------------

SP_HEADS, SP_KV_HEADS, CHUNK = 6, 2, 13  # 6 query heads split over 2 and 3 ranks; 13: odd runs
SP_SPANS = {
    **SPANS,
    "window-9": Span("window", 9),  # narrower than a run: the halo exchange
    "window-20": Span("window", 20),  # wider: the ring
    "s2-12": Span("s2", 12),  # the halo, its two kinds of heads (and their sinks) apart
    "sf-12-sink4": Span("sf", 12, 4),  # SinkLoRA's sink tokens (a second key block) and learnable sinks
}
SOFTCAP = 1.5


def _sp_cases(world):
    cases = [("ring", layout, span, cu) for layout in ("zigzag", "contiguous") for span in SP_SPANS for cu in (0, 1)]
    cases += [("ulysses", layout, span, 1) for layout in ("zigzag", "contiguous") for span in ("causal", "window-9")]
    cases += [("ulysses", "zigzag", "full", 0)]
    if world == 2:  # hybrid on two ranks: a ring of two Ulysses groups of one, and one group of two
        cases += [
            (f"hybrid-{r}x{u}", "zigzag", span, 1) for r, u in ((2, 1), (1, 2)) for span in ("causal", "window-9")
        ]
    return cases


def _sp_method(name, world):
    from torch.distributed.device_mesh import init_device_mesh

    from lsts.parallel import hybrid_attention, ring_attention, ulysses_attention

    if name == "ring":
        return ring_attention
    if name == "ulysses":
        return ulysses_attention
    n_ring, n_uly = (int(x) for x in name.removeprefix("hybrid-").split("x"))
    mesh = init_device_mesh("cpu", (n_ring, n_uly), mesh_dim_names=("ring", "ulysses"))
    return lambda *a, **kw: hybrid_attention(*a, mesh=mesh, **kw)


def _sp_all_cases(rank, world):
    import torch.distributed as dist

    from lsts.parallel import gather_sequence, shard_sequence

    results = {}
    for method, layout, span_name, with_docs in _sp_cases(world):
        n = (2 if layout == "zigzag" else 1) * CHUNK * world
        cu = [0, 3, n // 3 + 1, n // 2 + 2, n - 5, n] if with_docs else None
        g = torch.Generator().manual_seed(len(results))
        q, dout = (2 * torch.randn(1, n, SP_HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (2 * torch.randn(1, n, SP_KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        sinks = torch.randn(SP_HEADS, generator=g, dtype=torch.float64)
        span = SP_SPANS[span_name]
        local = [shard_sequence(x, layout=layout).requires_grad_() for x in (q, k, v)]
        local_sinks = sinks.clone().requires_grad_()
        fn = _sp_method(method, world)
        out, lse = fn(
            *local, layout=layout, span=span, cu_seqlens=cu, return_lse=True, backend="torch", softcap=SOFTCAP,
            sinks=local_sinks,
        )  # fmt: skip
        out.backward(shard_sequence(dout, layout=layout))
        dsinks = local_sinks.grad.clone()
        dist.all_reduce(dsinks)  # each rank holds its queries' / heads' part
        got = [gather_sequence(x.detach(), layout=layout) for x in (out, lse.transpose(1, 2), *(x.grad for x in local))]
        got[1] = got[1].transpose(1, 2)
        want = oracle(q, k, v, sinks, dout, span, SOFTCAP, cu)
        results[(method, layout, span_name, with_docs)] = errors([*got, dsinks], want)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def sp_results(request):
    from tests.distributed import run_ranks

    return request.param, run_ranks(_sp_all_cases, request.param)


def test_sequence_parallel_float64(sp_results):
    world, per_rank = sp_results
    assert len(per_rank[0]) == len(_sp_cases(world))
    for rank, results in enumerate(per_rank):
        bad = {case: errs for case, errs in results.items() if max(errs.values()) > 1e-10}
        assert not bad, f"rank {rank} of {world}: {bad}"


def test_the_narrow_window_takes_the_halo_and_the_wide_one_the_ring():
    from lsts.parallel.halo import halo_applies

    for world in (2, 3):
        for layout in ("zigzag", "contiguous"):
            s_local = (2 if layout == "zigzag" else 1) * CHUNK
            assert halo_applies(SP_SPANS["window-9"], layout, s_local, world)
            assert halo_applies(SP_SPANS["s2-12"], layout, s_local, world)
        assert not halo_applies(SP_SPANS["window-20"], "zigzag", 2 * CHUNK, world)


def _bad_calls(rank, world):
    """Arguments that are wrong on one rank, or differ between ranks: every rank must raise."""
    from lsts.parallel import hybrid_attention, ring_attention, rsa_attention, ulysses_attention

    q = torch.randn(1, 8, 4, 8)
    k = torch.randn(1, 8, 2, 8)
    sinks = torch.zeros(4)
    calls = {
        "softcap differs": lambda: ring_attention(q, k, k, softcap=1.0 + rank),
        "sinks on one rank": lambda: ulysses_attention(q, k, k, sinks=sinks if rank else None),
        "sinks of the wrong shape on one rank": lambda: ring_attention(q, k, k, sinks=torch.zeros(4 + rank)),
        "negative softcap on one rank": lambda: ring_attention(q, k, k, softcap=-float(rank)),
        "rsa with sinks": lambda: rsa_attention(q, k, k, sinks=sinks),
        "hybrid softcap differs": lambda: hybrid_attention(
            q, k, k, ring_group=None, ulysses_group=None, mesh=_mesh(), softcap=float(rank)
        ),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
        except ValueError as e:
            messages[name] = str(e)
    return messages


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1, 2), mesh_dim_names=("ring", "ulysses"))


def test_bad_or_mismatched_softcap_and_sinks_raise_on_every_rank():
    from tests.distributed import run_ranks

    per_rank = run_ranks(_bad_calls, 2)
    for rank, messages in enumerate(per_rank):
        assert len(messages) == 6, (rank, messages)
        assert "softcap" in messages["softcap differs"] and "same on every rank" in messages["softcap differs"]
        assert "sinks" in messages["sinks on one rank"]
        assert "rsa_attention implements neither softcap nor sinks" in messages["rsa with sinks"]
        assert "softcap" in messages["hybrid softcap differs"]
    assert "one logit per query head" in per_rank[1]["sinks of the wrong shape on one rank"]
    assert "softcap must be finite and >= 0" in per_rank[1]["negative softcap on one rank"]


def test_model_api_passes_softcap_and_sinks():
    """`lsts.attention.attention`, the call models make, hands both arguments to the method."""
    from lsts.attention import LOCAL
    from lsts.attention import attention as model_attention

    q, k, v, sinks, dout = inputs(21, seed=4)
    q, k, v, sinks = (x.clone().requires_grad_() for x in (q, k, v, sinks))
    out = model_attention(q, k, v, Span("window", 6), LOCAL, softcap=SOFTCAP, sinks=sinks)
    out.backward(dout)
    want = oracle(q, k, v, sinks, dout, Span("window", 6), SOFTCAP)
    got = [out, None, q.grad, k.grad, v.grad, sinks.grad]
    assert max(errors(got, [want[0], None, *want[2:]]).values()) <= 1e-10
