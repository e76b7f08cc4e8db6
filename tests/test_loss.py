"""Chunked linear + cross-entropy: the Triton kernel (interpreted on CPU) and the PyTorch chunk loop
against the float64 reference on the loss, the token count and both gradients; odd sizes, ragged
chunks, ignored tokens (a whole chunk of them, and every token), soft-capping, NaN-poisoned buffers,
bad input, and a probe showing that the chunked path never creates a ``[tokens, vocab]`` tensor."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lsts.kernels import buffers
from lsts.kernels import loss as loss_mod
from lsts.kernels.buffers import kernel_buffer
from lsts.kernels.loss import linear_cross_entropy
from lsts.kernels.loss import triton as loss_triton
from tests.oracle import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
D_LOSS = 0.75  # upstream gradient of the loss: the backward must scale by it, not assume 1

CASES = [  # (tokens N, d, vocab V, chunk_size)
    pytest.param((63, 40, 1000, 16), id="n63-d40-v1000-chunk16"),
    pytest.param((64, 32, 256, 64), id="n64-one-chunk"),
    pytest.param((50, 24, 77, 128), id="chunk-over-n-v77"),
]
REDUCTIONS = ["sum", "mean"]
TORCH_TOL = [
    pytest.param(torch.float64, 1e-10, id="f64"),
    pytest.param(torch.float32, 1e-5, id="f32"),
    pytest.param(torch.float16, 2e-3, id="f16"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
]
TRITON_TOL = [  # the interpreter mishandles bfloat16: not tested here
    pytest.param(torch.float32, 1e-5, id="f32"),
    pytest.param(torch.float16, 2e-3, id="f16"),
]


@pytest.fixture
def allocations(monkeypatch):
    """The shapes of the buffers the module allocates for itself through `kernel_buffer`, which
    NaN-poisons them under the tests (``tests/conftest.py``), so an element left unwritten fails."""
    shapes = []

    def recorded(shape, dtype, device):
        shapes.append(tuple(shape))
        return kernel_buffer(shape, dtype, device)

    monkeypatch.setattr(loss_mod, "kernel_buffer", recorded)
    return shapes


def _inputs(case, dtype, seed=0):
    n, d, v, chunk = case
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    # Logits of a few units: the softmax is neither flat nor one-hot, so errors in either term show.
    weight = torch.randn(v, d, generator=g) * (3.0 / d**0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[chunk : 2 * chunk] = IGNORE  # a whole chunk ignored, where there is a second chunk
    labels[::7] = IGNORE
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), labels.to(DEVICE)


def _run(backend, hidden, weight, labels, **kw):
    """``loss, n_tokens, dhidden, dweight`` of one backend, with upstream gradient ``D_LOSS``."""
    h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    loss, n = linear_cross_entropy(h, w, labels, backend=backend, **kw)
    dh, dw = torch.autograd.grad(loss, (h, w), torch.full_like(loss, D_LOSS))
    return loss.detach(), n, dh, dw


def _oracle(hidden, weight, labels, **kw):
    return _run("reference", hidden.double(), weight.double(), labels, **kw)


def _assert_matches(got, want, dtype, tol):
    loss, n, dh, dw = got
    assert n.dtype == torch.int64 and n.dim() == 0 and n.item() == want[1].item()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(loss, want[0]) <= tol, f"loss: rel err {rel_err(loss, want[0]):.2e}"
    for name, g, w in (("dhidden", dh, want[2]), ("dweight", dw, want[3])):
        assert g.shape == w.shape and g.dtype == dtype, f"{name}: {g.shape} {g.dtype}"
        assert rel_err(g, w) <= tol, f"{name}: rel err {rel_err(g, w):.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype,tol", TORCH_TOL)
@pytest.mark.parametrize("case", CASES)
def test_torch_matches_reference(case, dtype, tol):
    h, w, y = _inputs(case, dtype)
    _assert_matches(_run("torch", h, w, y, chunk_size=case[3]), _oracle(h, w, y, chunk_size=case[3]), dtype, tol)


@pytest.mark.parametrize("max_block", [256, 4096], ids=["vocab-blocks256", "one-block"])
@pytest.mark.parametrize("dtype,tol", TRITON_TOL)
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, dtype, tol, max_block, monkeypatch):
    # Small vocabulary blocks make the online log-sum-exp combine several blocks and a ragged tail.
    monkeypatch.setattr(loss_triton, "_MAX_BLOCK_V", max_block)
    h, w, y = _inputs(case, dtype)
    _assert_matches(_run("triton", h, w, y, chunk_size=case[3]), _oracle(h, w, y, chunk_size=case[3]), dtype, tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mean_reduction_divides_by_the_non_ignored_tokens(backend, monkeypatch):
    monkeypatch.setattr(loss_triton, "_MAX_BLOCK_V", 256)
    h, w, y = _inputs((63, 40, 1000, 16), torch.float32, seed=1)
    kw = dict(chunk_size=16, reduction="mean")
    got, want = _run(backend, h, w, y, **kw), _oracle(h, w, y, **kw)
    _assert_matches(got, want, torch.float32, 1e-5)
    summed = _run(backend, h, w, y, chunk_size=16)
    torch.testing.assert_close(got[0] * got[1], summed[0])  # what a token-weighted mean across ranks relies on


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcap_matches_reference(backend, monkeypatch):
    monkeypatch.setattr(loss_triton, "_MAX_BLOCK_V", 256)
    case = (63, 40, 1000, 16)
    h, w, y = _inputs(case, torch.float32, seed=3)
    w = w * 3.0  # logits well past the cap, where tanh bends
    kw = dict(chunk_size=16, softcap=5.0)
    _assert_matches(_run(backend, h, w, y, **kw), _oracle(h, w, y, **kw), torch.float32, 1e-5)


def test_leading_dims_are_flattened():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 31, 40, generator=g, dtype=torch.float64)
    w = torch.randn(300, 40, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, 300, (2, 31), generator=g)
    y[1, :5] = IGNORE
    got = _run("torch", h, w, y, chunk_size=10)
    assert got[2].shape == (2, 31, 40)
    _assert_matches(got, _oracle(h, w, y, chunk_size=10), torch.float64, 1e-10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_all_tokens_ignored_gives_zeros_not_nan(backend, reduction):
    h, w, _ = _inputs((40, 16, 90, 16), torch.float32)
    y = torch.full((40,), IGNORE, device=DEVICE)
    loss, n, dh, dw = _run(backend, h, w, y, chunk_size=16, reduction=reduction)
    assert n.item() == 0 and loss.item() == 0.0
    assert (dh == 0).all() and (dw == 0).all()


def test_frozen_weight_and_no_grad():
    h, w, y = _inputs((63, 40, 1000, 16), torch.float64)
    want = _oracle(h, w, y, chunk_size=16)
    hg = h.clone().requires_grad_()
    loss, _ = linear_cross_entropy(hg, w, y, chunk_size=16, backend="torch")  # weight needs no grad
    (dh,) = torch.autograd.grad(loss, hg, torch.tensor(D_LOSS, dtype=loss.dtype))
    assert rel_err(dh, want[2]) <= 1e-10
    with torch.no_grad():
        loss, n = linear_cross_entropy(h, w, y, chunk_size=16, backend="torch")
    assert not loss.requires_grad and rel_err(loss, want[0]) <= 1e-10 and n == want[1]


@pytest.mark.skipif(DEVICE == "cuda", reason="'auto' picks triton on CUDA; this checks the CPU choice")
def test_auto_is_the_torch_chunk_loop_on_cpu():
    h, w, y = _inputs((63, 40, 1000, 16), torch.float32)
    torch.testing.assert_close(_run("auto", h, w, y, chunk_size=16), _run("torch", h, w, y, chunk_size=16))


def test_poisoned_allocations_are_the_real_buffers(allocations):
    """The chunk buffer and both gradient outputs come from `kernel_buffer`, which starts them as NaN
    under the tests, so the comparisons above would see an unwritten element."""
    assert buffers.POISON, "tests/conftest.py turns NaN poisoning on"
    assert kernel_buffer((3,), torch.float32, "cpu").isnan().all()
    n, d, v, chunk = 63, 40, 1000, 16
    _run("torch", *_inputs((n, d, v, chunk), torch.float32), chunk_size=chunk)
    assert {(chunk, v), (n, d), (v, d)} <= set(allocations)


# --- memory ---------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _largest_tensor(backend, n, d, v, chunk):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    with _LargestTensor() as probe:
        loss, _ = linear_cross_entropy(h, w, y, chunk_size=chunk, backend=backend)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    return probe.numel


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU memory probe of the torch chunk loop")
def test_chunked_path_never_creates_a_tokens_by_vocab_tensor():
    # The probe does see the reference's full logits...
    assert _largest_tensor("reference", 256, 16, 1000, 64) >= 256 * 1000
    # ...and at 8192 tokens × 32000 vocab (1 GiB of float32 logits) the chunk loop's largest tensor
    # is one chunk's logits (1024 × 32000, 125 MiB).
    n, v, chunk = 8192, 32000, 1024
    assert _largest_tensor("torch", n, 16, v, chunk) == chunk * v


# --- bad input ------------------------------------------------------------------------------------


def _bad(**change):
    h, w, y = _inputs((63, 40, 1000, 16), torch.float32)
    args = dict(hidden=h, weight=w, labels=y, reduction="sum", chunk_size=16, backend="torch", softcap=None)
    args.update(change)
    return args


BAD = [
    pytest.param(_bad(weight=torch.zeros(1000, 41)), r"d = 40", id="weight-d-mismatch"),
    pytest.param(_bad(labels=torch.zeros(64, dtype=torch.long)), r"\(64,\)", id="labels-shape"),
    pytest.param(_bad(labels=torch.zeros(63)), r"torch.float32", id="float-labels"),
    pytest.param(_bad(labels=torch.full((63,), 1000)), r"\[0, 1000\).*got 1000", id="label-out-of-vocab"),
    pytest.param(_bad(reduction="avg"), r"'avg'", id="unknown-reduction"),
    pytest.param(_bad(chunk_size=0), r"chunk_size.*got 0", id="chunk-size-0"),
    pytest.param(_bad(weight=torch.zeros(1000, 40, dtype=torch.float64)), r"float64", id="dtype-mismatch"),
    pytest.param(_bad(softcap=-1.0), r"softcap.*-1.0", id="negative-softcap"),
    pytest.param(_bad(backend="cuda"), r"'cuda'", id="unknown-backend"),
]


@pytest.mark.parametrize("args,match", BAD)
def test_bad_input_raises_value_error_naming_the_value(args, match):
    args = dict(args)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
