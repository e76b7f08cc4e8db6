"""RMSNorm: the Triton kernels (interpreted on CPU) and the PyTorch backend against the float64
reference, on the output and on both gradients; odd sizes, strided rows, mixed weight dtype, NaN-
poisoned kernel outputs, and the errors of bad input."""

import pytest
import torch

from lsts.kernels import _utils
from lsts.kernels.norm import RMSNorm, rms_norm
from tests.oracle import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [
    pytest.param((63, 40), id="rows63-d40"),
    pytest.param((2, 5, 64), id="b2-s5-d64"),
    pytest.param((3, 1000), id="rows3-d1000"),
]
TRITON_TOL = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 5e-3, id="fp16"),
]


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernel forgets to write fails the test."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "empty", nan_empty)


def _inputs(shape, dtype, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g) * 3.0  # away from 1 so that a missing normalization shows
    w = 1.0 + 0.5 * torch.randn(d, generator=g)
    dy = torch.randn(shape, generator=g)
    return x.to(DEVICE, dtype), w.to(DEVICE, w_dtype or dtype), dy.to(DEVICE, dtype)


def _run(backend, x, w, dy, eps=1e-6):
    """``out, dx, dweight`` of one backend."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = rms_norm(x, w, eps, backend=backend)
    dx, dw = torch.autograd.grad(out, (x, w), dy)
    return out.detach(), dx, dw


def _oracle(x, w, dy, eps=1e-6):
    return _run("reference", x.double(), w.double(), dy.double(), eps)


def _assert_close(got, want, dtypes, tol):
    for name, g, w, dt in zip(("out", "dx", "dweight"), got, want, dtypes):
        assert g.shape == w.shape and g.dtype == dt, f"{name}: {g.shape} {g.dtype}"
        err = rel_err(g, w)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype,tol", TRITON_TOL)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype, tol):
    x, w, dy = _inputs(shape, dtype)
    _assert_close(_run("triton", x, w, dy), _oracle(x, w, dy), (dtype,) * 3, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_matches_reference(shape, dtype, tol):
    x, w, dy = _inputs(shape, dtype)
    _assert_close(_run("torch", x, w, dy), _oracle(x, w, dy), (dtype,) * 3, tol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_transformers_llama_rmsnorm_in_half(backend):
    """Llama's order (round the normalized row to float16, then multiply by the weight): the torch
    backend repeats transformers' ops exactly; the Triton row sum may round rstd one ulp apart,
    which moves an element by at most about one float16 ulp."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w, dy = _inputs((63, 40), torch.float16)
    hf = LlamaRMSNorm(40, eps=1e-6).to(DEVICE, torch.float16)
    with torch.no_grad():
        hf.weight.copy_(w)
        want = hf(x)
    out, _, _ = _run(backend, x, w, dy)
    if backend == "torch":
        assert torch.equal(out, want)
    else:
        assert rel_err(out, want) <= 2e-3


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float32_weight_with_half_activations(backend):
    """Master weights in float32, activations in float16: output in float16, dweight in float32."""
    x, w, dy = _inputs((63, 40), torch.float16, w_dtype=torch.float32)
    got = _run(backend, x, w, dy)
    _assert_close(got, _oracle(x, w, dy), (torch.float16, torch.float16, torch.float32), 5e-3)


def test_triton_strided_rows_and_leading_dims():
    """Rows that are not packed (a slice of a wider buffer) and a gradient with a transposed layout."""
    wide, w, _ = _inputs((63, 56), torch.float32)
    x = wide[:, 8:48]  # row stride 56, d = 40
    dy = torch.randn(40, 63, device=DEVICE).t()  # unit stride along rows, not d: copied to packed rows
    got, want = _run("triton", x, w[:40], dy), _oracle(x, w[:40], dy)
    _assert_close(got, want, (torch.float32,) * 3, 1e-5)


def test_triton_eps_matters_and_zero_rows():
    x, w, dy = _inputs((4, 40), torch.float32)
    x = x * 1e-3  # mean(x²) ~ 1e-5: an eps of 1e-2 dominates it
    _assert_close(_run("triton", x, w, dy, eps=1e-2), _oracle(x, w, dy, eps=1e-2), (torch.float32,) * 3, 1e-5)
    empty = torch.zeros(0, 40, device=DEVICE)
    out, dx, dw = _run("triton", empty, w, empty)
    assert out.shape == (0, 40) and dx.shape == (0, 40) and torch.equal(dw, torch.zeros_like(w))


def test_module_uses_its_backend():
    layer = RMSNorm(40, eps=1e-5, backend="torch", device=DEVICE)
    assert torch.equal(layer.weight.detach(), torch.ones(40, device=DEVICE)) and "backend='torch'" in repr(layer)
    x, w, _ = _inputs((2, 7, 40), torch.float32)
    with torch.no_grad():
        layer.weight.copy_(w)
    torch.testing.assert_close(layer(x), rms_norm(x, w, 1e-5, backend="reference"), rtol=1e-6, atol=1e-6)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (40,)


@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(lambda: rms_norm(torch.randn(4, 8), torch.ones(7)), r"weight must be \[d\] = \[8\]", id="d"),
        pytest.param(lambda: rms_norm(torch.randn(4, 8), torch.ones(1, 8)), r"weight must be \[d\]", id="weight-2d"),
        pytest.param(lambda: rms_norm(torch.ones(4, 8, dtype=torch.int64), torch.ones(8)), "floating", id="int-x"),
        pytest.param(lambda: rms_norm(torch.randn(4, 8), torch.ones(8), eps=-1.0), "eps must be >= 0", id="eps"),
        pytest.param(lambda: rms_norm(torch.randn(4, 8), torch.ones(8), backend="cuda"), "unknown", id="backend"),
        pytest.param(lambda: RMSNorm(8, backend="fast"), "unknown RMSNorm backend 'fast'", id="module-backend"),
        pytest.param(lambda: RMSNorm(0), "dim must be >= 1", id="module-dim"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
