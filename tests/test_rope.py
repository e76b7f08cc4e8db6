"""RoPE at global position ids: the Triton kernel (interpreted on CPU) and the PyTorch backend
against the complex-number reference on the output and dx; transformers' Llama rotary embedding with
linear scaling; shards with non-contiguous positions; NaN-poisoned kernel outputs; bad input."""

import pytest
import torch

from lsts.kernels import _utils
from lsts.kernels.rope import apply_rope, rope_frequencies
from tests.oracle import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch", "reference"]


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernel forgets to write fails the test."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "empty", nan_empty)


def _zigzag_positions(c: int, offset: int = 0) -> torch.Tensor:
    """Rank 0 of a 2-rank zigzag shard of 4c tokens: ``[0, c) ∪ [3c, 4c)`` (plus an offset)."""
    return torch.cat([torch.arange(0, c), torch.arange(3 * c, 4 * c)]).to(DEVICE) + offset


def _inputs(b, s, h, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(b, s, h, d, generator=g), torch.randn(b, s, h, d, generator=g)
    return x.to(DEVICE, dtype), dy.to(DEVICE, dtype)


def _run(backend, x, positions, dy, **kw):
    """``out, dx`` of one backend."""
    x = x.detach().clone().requires_grad_()
    out = apply_rope(x, positions, backend=backend, **kw)
    (dx,) = torch.autograd.grad(out, x, dy)
    return out.detach(), dx


def _assert_close(got, want, dtype, tol):
    for name, g, w in zip(("out", "dx"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, f"{name}: {g.shape} {g.dtype}"
        err = rel_err(g, w)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


CASES = [  # (batch, seq, heads, head_dim, positions)
    pytest.param((1, 63, 3, 40, "arange"), id="s63-h3-d40-arange"),
    pytest.param((2, 64, 3, 40, "zigzag"), id="s64-h3-d40-zigzag"),
    pytest.param((2, 63, 2, 64, "batch"), id="s63-d64-per-batch"),
]


def _positions(b, s, kind):
    if kind == "arange":
        return torch.arange(s, device=DEVICE)
    if kind == "zigzag":
        return _zigzag_positions(s // 2, offset=1000)
    return torch.randint(0, 8192, (b, s), generator=torch.Generator().manual_seed(1)).to(DEVICE)


BACKEND_CASES = [  # (backend, dtype, tolerance): Triton in fp32/fp16, the torch twin in f64/f32
    pytest.param("triton", torch.float32, 1e-5, id="triton-fp32"),
    pytest.param("triton", torch.float16, 2e-3, id="triton-fp16"),
    pytest.param("torch", torch.float64, 1e-12, id="torch-f64"),
    pytest.param("torch", torch.float32, 1e-6, id="torch-f32"),
]


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_CASES)
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_reference(case, backend, dtype, tol):
    b, s, h, d, kind = case
    x, dy = _inputs(b, s, h, d, dtype)
    pos = _positions(b, s, kind)
    got = _run(backend, x, pos, dy, base=500.0, scaling_factor=3.0)
    _assert_close(got, _run("reference", x.double(), pos, dy.double(), base=500.0, scaling_factor=3.0), dtype, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformers_llama_linear_rope(backend):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb with rope_type="linear", factor 4,
    at the global positions of a zigzag shard; its layout is [B, H, S, D], so lsts gets a
    transposed (non-contiguous) view."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    b, s, h, d = 2, 32, 3, 40
    config = LlamaConfig(
        hidden_size=h * d, num_attention_heads=h, num_key_value_heads=h, head_dim=d, num_hidden_layers=1,
        intermediate_size=16, vocab_size=32, max_position_embeddings=4096, rope_theta=500.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )  # fmt: skip
    q_hf, k_hf = (torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in (0, 1))
    pos = _zigzag_positions(s // 2, offset=2000)
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(q_hf, pos.expand(b, s))
    want_q, want_k = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)

    for x_hf, want in ((q_hf, want_q), (k_hf, want_k)):
        got = apply_rope(x_hf.transpose(1, 2), pos, base=500.0, scaling_factor=4.0, backend=backend)
        assert rel_err(got.transpose(1, 2), want) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_with_global_positions_equals_shard_of_full(backend):
    """Rotating each zigzag shard at its global positions equals the shard of the rotated sequence,
    in the output and in the gradient."""
    c = 8
    x, dy = _inputs(1, 4 * c, 2, 40, torch.float32)
    out, dx = _run(backend, x, torch.arange(4 * c, device=DEVICE), dy, scaling_factor=2.0)
    for shard in (_zigzag_positions(c), torch.cat([torch.arange(c, 2 * c), torch.arange(2 * c, 3 * c)]).to(DEVICE)):
        got_out, got_dx = _run(backend, x[:, shard], shard, dy[:, shard], scaling_factor=2.0)
        torch.testing.assert_close(got_out, out[:, shard], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_dx, dx[:, shard], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_scaling_divides_positions(backend):
    """A factor of 4 at position 4p is the unscaled rotation at p (exact: 4 is a power of two)."""
    x, _ = _inputs(2, 16, 2, 40, torch.float32)
    pos = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    scaled = apply_rope(x, 4 * pos, scaling_factor=4.0, backend=backend)
    torch.testing.assert_close(scaled, apply_rope(x, pos, backend=backend), rtol=0, atol=0)


def test_triton_backward_inverts_forward_and_keeps_norm():
    """A rotation keeps each pair's length, and its gradient map (rotation back) undoes it."""
    x, _ = _inputs(1, 7, 5, 24, torch.float32)
    pos = torch.arange(100, 107, device=DEVICE)
    y = apply_rope(x, pos, backend="triton")
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)
    _, back = _run("triton", x, pos, y)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_frequencies():
    inv = rope_frequencies(8, base=10000.0)
    assert inv.dtype == torch.float32 and inv.shape == (4,)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1, 0.01, 0.001]))


X = torch.randn(2, 6, 2, 8)


@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(lambda: apply_rope(torch.randn(2, 6, 2, 7), torch.arange(6)), "even head_dim", id="odd-d"),
        pytest.param(lambda: apply_rope(X, torch.arange(7)), r"\[S\] = \[6\] or \[B, S\] = \[2, 6\]", id="pos-s"),
        pytest.param(lambda: apply_rope(X, torch.zeros(3, 6, dtype=torch.int64)), r"got \(3, 6\)", id="pos-b"),
        pytest.param(lambda: apply_rope(X, torch.arange(6.0)), "integer position ids", id="pos-float"),
        pytest.param(lambda: apply_rope(X[0], torch.arange(6)), r"x \[B, S, H, D\]", id="x-3d"),
        pytest.param(lambda: apply_rope(X, torch.arange(6), scaling_factor=0.0), "scaling_factor", id="factor"),
        pytest.param(lambda: apply_rope(X, torch.arange(6), base=-1.0), "base must be > 0", id="base"),
        pytest.param(lambda: apply_rope(X, torch.arange(6), backend="fast"), "unknown", id="backend"),
        pytest.param(lambda: rope_frequencies(7), "head_dim must be even", id="freq-odd"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
