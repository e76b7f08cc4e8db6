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
