"""Local (out, lse) kernels: the fused CPU backend against the float64 explicit softmax of tests/oracle.py,
and the merge rule."""

import pytest
import torch

from lsts.kernels.attention import FULL, attention, attention_bwd, attention_fwd, merge_into, reference
from tests.oracle import explicit_attention, full_attention, rel_err

SHAPES = [  # (batch, seq, heads, kv_heads, head_dim)
    pytest.param((2, 63, 4, 4, 40), id="odd-seq63-d40"),
    pytest.param((1, 128, 8, 2, 64), id="gqa-h8-kv2"),
    pytest.param((2, 37, 6, 1, 20), id="mqa-seq37-d20"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_matches_reference(shape, dtype, tol, causal):
    b, s, h, hkv, d = shape
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(b, s, h, d, dtype=dtype),
        torch.randn(b, s, hkv, d, dtype=dtype),
        torch.randn(b, s, hkv, d, dtype=dtype),
    )
    dout = torch.randn(b, s, h, d, dtype=dtype)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = attention(qg, kg, vg, causal=causal, backend="torch")
    out.backward(dout)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = full_attention(q, k, v, dout, causal)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, qg.grad, kg.grad, vg.grad), ref):
        assert got.shape == want.shape, name
        assert rel_err(got, want) <= tol, f"{name}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_partition_backward_with_global_lse(backend):
    """Backward over a split of the keys, each part given the *global* out and lse, sums to the
    full gradient: the identity ring attention's backward relies on."""
    torch.manual_seed(1)
    q, k, v = (
        torch.randn(1, 10, 2, 8, dtype=torch.float64),
        torch.randn(1, 23, 2, 8, dtype=torch.float64),
        torch.randn(1, 23, 2, 8, dtype=torch.float64),
    )
    dout = torch.randn(1, 10, 2, 8, dtype=torch.float64)
    out, lse, dq, dk, dv = full_attention(q, k, v, dout, causal=False)
    parts = [
        attention_bwd(dout, q, k[:, sl], v[:, sl], out, lse, 8**-0.5, FULL, backend)
        for sl in (slice(0, 9), slice(9, 23))
    ]
    torch.testing.assert_close(parts[0][0] + parts[1][0], dq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], 1), dk, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]], 1), dv, rtol=1e-10, atol=1e-12)


def test_merge_equals_attention_over_the_union():
    torch.manual_seed(2)
    q, k, v = (
        torch.randn(2, 9, 3, 16, dtype=torch.float64),
        torch.randn(2, 30, 3, 16, dtype=torch.float64),
        torch.randn(2, 30, 3, 16, dtype=torch.float64),
    )
    out = torch.zeros(2, 9, 3, 16, dtype=torch.float64)
    lse = torch.full((2, 3, 9), float("-inf"), dtype=torch.float64)
    for sl in (slice(20, 30), slice(0, 7), slice(7, 20)):  # any order: the merge is order-free
        merge_into(out, lse, *attention_fwd(q, k[:, sl], v[:, sl], 0.25, FULL, "torch"))
    want_out, want_lse = explicit_attention(q, k, v, torch.ones(9, 30, dtype=torch.bool), 0.25)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)


def test_merge_with_fully_masked_block_is_identity_and_never_nan():
    out, lse = torch.zeros(1, 4, 1, 2), torch.full((1, 1, 4), float("-inf"))
    merge_into(out, lse, torch.zeros(1, 4, 1, 2), torch.full((1, 1, 4), float("-inf")))
    assert not out.isnan().any() and torch.isinf(lse).all()  # both -inf: still empty, no NaN
    block, block_lse = torch.randn(1, 4, 1, 2), torch.randn(1, 1, 4)
    merge_into(out, lse, block, block_lse)
    merge_into(out, lse, torch.randn(1, 4, 1, 2), torch.full((1, 1, 4), float("-inf")))
    torch.testing.assert_close(out, block)
    torch.testing.assert_close(lse, block_lse)


def test_reference_fully_masked_row_gives_zero_and_minus_inf():
    q, k = torch.randn(1, 3, 1, 4, dtype=torch.float64), torch.randn(1, 5, 1, 4, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out, lse = reference.attention_fwd(q, k, k, 0.5, mask=mask)
    assert torch.isneginf(lse[0, 0, 1]) and (out[0, 1] == 0).all() and torch.isfinite(lse[0, 0, [0, 2]]).all()


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: (torch.randn(1, 8, 4, 8), torch.randn(1, 8, 3, 8), torch.randn(1, 8, 3, 8)),
            "multiple of key/value heads",
        ),
        (lambda: (torch.randn(1, 8, 4, 8), torch.randn(1, 8, 4, 6), torch.randn(1, 8, 4, 6)), "head_dim"),
        (
            lambda: (torch.randn(8, 4, 8), torch.randn(8, 4, 8), torch.randn(8, 4, 8)),
            r"\[batch, seq, heads, head_dim\]",
        ),
        (lambda: (torch.randn(1, 8, 4, 8), torch.randn(1, 8, 4, 8).double(), torch.randn(1, 8, 4, 8)), "dtype"),
    ],
    ids=["heads-not-divisible", "head-dim-differs", "not-4d", "dtype-differs"],
)
def test_bad_local_input_names_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        attention(*make(), causal=True)


def test_unknown_backend_is_an_error():
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attention(x, x, x, backend="fast")


def test_attention_dispatches_through_the_cp_methods_registry(monkeypatch):
    """A mode is one `CP_METHODS` entry: accepted by `AttentionContext`, called by `attention` with
    the context and every keyword; an unknown mode names the registered ones."""
    from lsts.attention import CP_METHODS, AttentionContext
    from lsts.attention import attention as model_attention

    calls = []
    monkeypatch.setitem(CP_METHODS, "mine", lambda q, k, v, ctx, **kw: calls.append((ctx, kw)) or q)
    q = torch.randn(1, 4, 2, 8)
    ctx = AttentionContext(mode="mine", backend="torch")
    assert model_attention(q, q, q, ctx=ctx, softcap=5.0) is q
    [(got_ctx, kw)] = calls
    assert got_ctx is ctx and kw["softcap"] == 5.0 and kw["backend"] == "torch" and kw["cu_seqlens"] is None
    assert {"span", "softmax_scale", "sinks"} <= kw.keys()
    with pytest.raises(ValueError, match="'local', 'ring', 'ulysses', 'hybrid'"):
        AttentionContext(mode="bogus")
