"""Packed documents (``cu_seqlens``) on every backend: equal to attending each document on its own
(whole sequences), and to the document mask written out (blocks of a longer sequence at offsets,
as a ring step sees them): out, lse and every gradient."""

import itertools

import pytest
import torch

from lsts.kernels.attention import Documents, Span, attention
from lsts.kernels.backend import HAS_TRITON, triton_interpreting
from tests.oracle import explicit_attention, rel_err
from tests.test_span_attention import oracle

CU = [0, 5, 30, 31, 63]  # odd lengths, a one-token document
SPANS = [
    pytest.param(Span("causal"), id="causal"),
    pytest.param(Span("full"), id="full"),
    pytest.param(Span("window", 7), id="window7"),
    pytest.param(Span("sf", 12, 4), id="sf-sink4"),
]
CAN_TRITON = HAS_TRITON and (torch.cuda.is_available() or triton_interpreting())
BACKENDS = [  # (backend, dtype, tolerance)
    pytest.param("torch", torch.float64, 1e-10, id="torch-f64"),
    pytest.param("reference", torch.float64, 1e-12, id="reference-f64"),
    pytest.param(
        "triton",
        torch.float32,
        2e-5,
        id="triton-fp32",
        marks=pytest.mark.skipif(not CAN_TRITON, reason="needs triton with CUDA or TRITON_INTERPRET=1"),
    ),
]
DEVICE = {"triton": "cuda" if torch.cuda.is_available() else "cpu", "torch": "cpu", "reference": "cpu"}


def _inputs(sq, sk, h, hkv, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(1, sq, h, d, generator=g) for _ in range(2))
    k, v = (torch.randn(1, sk, hkv, d, generator=g) for _ in range(2))
    return q, k, v, dout


def _run(backend, dtype, q, k, v, dout, span, q_offset=0, k_offset=0, cu=CU):
    q, k, v, dout = (x.to(DEVICE[backend], dtype).requires_grad_(x is not dout) for x in (q, k, v, dout))
    out, lse = attention(q, k, v, span=span, q_offset=q_offset, k_offset=k_offset, backend=backend, cu_seqlens=cu)
    out.backward(dout)
    return [x.detach().cpu() for x in (out, lse, q.grad, k.grad, v.grad)]


def _assert_close(got, want, tol):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not a.isnan().any(), f"{name}: NaN"
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: rows without keys differ"
        if finite.any():
            assert rel_err(a[finite], b[finite]) <= tol, f"{name}: {rel_err(a[finite], b[finite]):.2e}"


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
@pytest.mark.parametrize("span", SPANS[:3])  # sinks are global positions: "sf" is not per document
def test_packed_documents_equal_each_document_alone(span, backend, dtype, tol):
    q, k, v, dout = _inputs(63, 63, 4, 2)
    got = _run(backend, dtype, q, k, v, dout, span)
    parts = []
    for lo, hi in itertools.pairwise(CU):
        parts.append(oracle(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], dout[:, lo:hi], span, 0, 0))
    want = [torch.cat([p[i] for p in parts], dim=2 if i == 1 else 1) for i in range(5)]
    _assert_close(got, want, tol)


def oracle_masked(q, k, v, dout, span, q_offset, k_offset, cu):
    """The document mask written out from document ids, on top of the span's own mask."""
    lengths = torch.tensor(cu[1:]) - torch.tensor(cu[:-1])
    doc_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    q_pos, k_pos = torch.arange(q.shape[1]) + q_offset, torch.arange(k.shape[1]) + k_offset
    same = doc_id[q_pos][:, None] == doc_id[k_pos][None, :]
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, lse = explicit_attention(q, k, v, span.mask(q_pos, k_pos, q.shape[2]) & same, q.shape[-1] ** -0.5)
    return [out.detach(), lse, *torch.autograd.grad(out, (q, k, v), dout.double())]


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
@pytest.mark.parametrize("span", SPANS)
def test_blocks_of_a_packed_sequence_at_offsets(span, backend, dtype, tol):
    """Queries 60..99 against keys 10..59 of a 110-token packed sequence: some queries' documents
    start after the key block (no visible key: out 0, lse -inf), some documents straddle it."""
    cu = [0, 17, 64, 65, 100, 110]
    q, k, v, dout = _inputs(40, 50, 6, 1, seed=1)
    got = _run(backend, dtype, q, k, v, dout, span, q_offset=60, k_offset=10, cu=cu)
    _assert_close(got, oracle_masked(q, k, v, dout, span, 60, 10, cu), tol)


def test_one_document_equals_no_documents():
    q, k, v, dout = _inputs(63, 63, 4, 2)
    with_docs = _run("torch", torch.float64, q, k, v, dout, Span("causal"), cu=[0, 63])
    without = _run("torch", torch.float64, q, k, v, dout, Span("causal"), cu=None)
    _assert_close(with_docs, without, 1e-12)


@pytest.mark.parametrize(
    "cu,match",
    [
        ([5, 63], "start at 0"),
        ([0, 30, 30, 63], "strictly increase"),
        ([0, 30, 40], "covers 40 positions"),
        (torch.zeros(1, 1, 2, dtype=torch.int64), "1-D"),
        ([[0, 63], [0, 63]], "2 rows of boundaries but the batch has 1"),  # per-row lists: one per row
    ],
)
def test_bad_cu_seqlens_is_a_clear_error(cu, match):
    q, k, v, _ = _inputs(63, 63, 2, 2)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, cu_seqlens=cu, backend="torch")


def test_documents_expand_per_position():
    docs = Documents.from_cu_seqlens([0, 2, 5])
    assert docs.start.tolist() == [0, 0, 2, 2, 2]
    assert docs.end.tolist() == [2, 2, 5, 5, 5]
    assert docs.bounds(1, 3) == (0, 5)


@pytest.mark.parametrize("backend", [pytest.param("torch"), pytest.param("triton", marks=BACKENDS[2].marks)])
def test_other_documents_are_never_read(backend):
    """NaN in the first document's K/V: the second document's rows stay finite only if the kernel
    never visits (not merely masks) the first document's tiles; work follows the documents."""
    from tests.test_triton_attention import skip_tile

    n = 2 * skip_tile(backend)
    q, k, v, _ = _inputs(n, n, 1, 1, d=16)
    k[:, : n // 2], v[:, : n // 2] = float("nan"), float("nan")
    out, _ = attention(*(x.to(DEVICE[backend]) for x in (q, k, v)), backend=backend, cu_seqlens=[0, n // 2, n])
    assert torch.isfinite(out[:, n // 2 :].cpu()).all()
