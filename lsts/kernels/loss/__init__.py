"""Linear + cross-entropy over a vocabulary without the ``[tokens, vocab]`` logits: at 131072 tokens a
32K vocabulary's float32 logits alone are 16 GiB, and their gradient as much again.

``linear_cross_entropy(hidden [N, d], weight [V, d], labels [N])`` returns the summed (or mean)
cross-entropy of ``hidden @ weight.T`` against ``labels`` over the tokens that are not
``ignore_index``, and the number of those tokens, so a trainer can form a token-weighted mean
across ranks by all-reducing both.

How (the chunked backends): the tokens are processed ``chunk_size`` rows at a time. For each chunk
the logits ``h_c @ W.T`` land in one reused ``[chunk_size, V]`` buffer; the loss and the gradient of
the logits, ``softmax - onehot``, are computed in place in that buffer; and the two gradient
matmuls follow at once (``grad_h_c = dlogits @ W``, ``grad_W += dlogits.T @ h_c``). So the forward
already holds ``grad_hidden [N, d]`` and ``grad_weight [V, d]`` (in the accumulation dtype), and the
backward only scales them by the incoming gradient. Peak extra memory is O(chunk_size × V + N × d +
V × d) instead of O(N × V). Logits and softmax run in float32 (float64 for float64 input); the
gradients come back in the input dtype.

Backends (chosen by argument, see `lsts.kernels.backend`):

- ``triton``: the chunk loop above, with the per-chunk log-sum-exp, loss and logits gradient in one
  Triton kernel (one program per token, two passes over the vocabulary in blocks: an online
  max / sum of exponentials, then the gradient written over the logits). The matmuls stay in torch.
  The kernel computes in float32, also for float64 input.
- ``torch``: the same loop with the per-chunk step as in-place PyTorch ops: the CPU path.
- ``reference``: ``F.cross_entropy(hidden @ weight.T, ...)`` with autograd, float64-capable; it
  builds the full logits and is the oracle of the tests.

``softcap`` (Gemma 2's logit soft-capping, ``z -> softcap * tanh(z / softcap)``) is applied to the
logits before the softmax in every backend.

Sources: the chunked "compute the gradient in the forward" scheme of fused linear-cross-entropy
kernels (Liger-Kernel's FusedLinearCrossEntropy, Wijmans et al., "Cut Your Losses in Large-
Vocabulary Language Models", 2024); online softmax (Milakov & Gimelshein, 2018); soft-capping as in
Gemma 2 (Gemma Team, 2024).

Limits: the gradients are computed whether or not ``backward`` is called (skipped only for inputs
that do not require grad or under ``no_grad``), and ``backward`` may run once per forward's work
(``retain_graph`` is fine, double backward is not supported). ``reduction="mean"`` over zero tokens
gives 0, not NaN as ``F.cross_entropy`` would. With half-precision inputs on CUDA the gradient
matmuls take the float32 logits gradient rounded to the input dtype (tensor-core speed, fp32
accumulation), and the float32 logits matmul needs ``torch.mm(..., out_dtype=)`` (torch >= 2.8;
older torch and CPU upcast half inputs per chunk).
"""

from __future__ import annotations

import torch

from lsts.kernels import _utils
from lsts.kernels.backend import resolve_backend
from lsts.kernels.buffers import kernel_buffer
from lsts.kernels.loss.reference import linear_cross_entropy_reference

IGNORE_INDEX = -100  # the label that trains nothing: torch.nn.functional.cross_entropy's and transformers' default
_SUPPORTED = ("triton", "torch", "reference")
_REDUCTIONS = ("sum", "mean")


# --- chunk loop -----------------------------------------------------------------------------------


_MM_HAS_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 8)


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with ``out`` in the accumulation dtype, whatever the operands' dtypes."""
    if a.dtype == b.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.is_cuda and _MM_HAS_OUT_DTYPE:
        # Half operands on tensor cores with a float32 result; a float32 operand is rounded to the other's dtype.
        half = b.dtype if b.dtype != out.dtype else a.dtype
        prod = torch.mm(a.to(half), b.to(half), out_dtype=out.dtype)
    else:
        prod = a.to(out.dtype) @ b.to(out.dtype)  # CPU half matmuls are slow and round; upcast per chunk
    if accumulate:
        out.add_(prod)
    else:
        out.copy_(prod)


def _chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    softcap: float | None,
    ce_chunk,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss and the unscaled gradients ``grad_hidden [N, d]``, ``grad_weight [V, d]`` (None
    where not needed), all in the accumulation dtype, ``chunk_size`` tokens at a time."""
    (n_rows, d), vocab, device = hidden.shape, weight.shape[0], hidden.device
    acc = _utils.acc_dtype(hidden.dtype)
    loss_sum = torch.zeros((), dtype=acc, device=device)
    grad_h = kernel_buffer((n_rows, d), acc, device) if need_h else None
    grad_w = None
    if need_w:  # the first chunk overwrites it; with no chunk at all it must already be zero
        empty = n_rows == 0
        grad_w = torch.zeros((vocab, d), dtype=acc, device=device) if empty else kernel_buffer((vocab, d), acc, device)
    # One buffer for every chunk: on CPU a fresh [C, V] allocation per chunk costs page faults each time.
    buf = kernel_buffer((min(chunk_size, n_rows), vocab), acc, device)
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        h_c, z = hidden[start:end], buf[: end - start]
        _mm_into(h_c, weight.T, z, accumulate=False)
        loss_sum += ce_chunk(z, labels[start:end], ignore_index, softcap).sum()
        if grad_h is not None:
            _mm_into(z, weight, grad_h[start:end], accumulate=False)
        if grad_w is not None:
            _mm_into(z.T, h_c, grad_w, accumulate=start > 0)
    return loss_sum, grad_h, grad_w


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, mean, chunk_size, softcap, ce_chunk, need_h, need_w):
        loss, grad_h, grad_w = _chunked_loss_and_grads(
            hidden, weight, labels, ignore_index, chunk_size, softcap, ce_chunk, need_h, need_w
        )
        n_tokens = (labels != ignore_index).sum()
        # The backward multiplier folds in the 1 / n of a mean: no extra pass over the gradients.
        denom = n_tokens.clamp(min=1).to(loss.dtype) if mean else None
        if mean:
            loss = loss / denom
        ctx.save_for_backward(grad_h, grad_w, denom)
        ctx.grad_dtype = hidden.dtype
        ctx.mark_non_differentiable(n_tokens)
        return loss, n_tokens

    @staticmethod
    def backward(ctx, d_loss, _d_n_tokens):
        grad_h, grad_w, denom = ctx.saved_tensors
        scale = d_loss if denom is None else d_loss / denom
        dh = None if grad_h is None else (grad_h * scale).to(ctx.grad_dtype)
        dw = None if grad_w is None else (grad_w * scale).to(ctx.grad_dtype)
        return dh, dw, None, None, None, None, None, None, None, None


# --- public API -----------------------------------------------------------------------------------


def _check(hidden, weight, labels, ignore_index, reduction, chunk_size, softcap) -> None:
    if hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point [..., d] tensor, got {tuple(hidden.shape)} {hidden.dtype}")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be the lm_head [V, d] with d = {d} to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight is {weight.dtype} but hidden {hidden.dtype}; cast one so that both match")
    if labels.shape != hidden.shape[:-1] and not (labels.dim() == 1 and labels.numel() * d == hidden.numel()):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])} (or be flat with that many "
            f"tokens), got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (token ids), got {labels.dtype}; use labels.long()")
    if weight.device != hidden.device or labels.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and labels ({labels.device}) must share one device"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {_REDUCTIONS}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
    if softcap is not None and not softcap > 0:  # also rejects NaN
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():  # one host sync per call: an out-of-range id would read past the logits row
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {first}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
    chunk_size: int = 4096,
    backend: str = "auto",
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without the full logits.

    ``hidden [..., d]`` (flattened to ``N`` tokens), ``weight [V, d]`` (the lm_head, no bias, same
    dtype), ``labels`` of shape ``hidden.shape[:-1]`` or ``[N]``, integer, already shifted by the
    caller; tokens equal to ``ignore_index`` contribute nothing. Returns ``(loss, n_tokens)``:
    ``loss`` (0-dim, float32; float64 for float64 input) is the sum over the non-ignored tokens
    (``reduction="sum"``) or their mean (``"mean"``, 0 when there are none); ``n_tokens`` is their
    count (int64, 0-dim, not differentiable). Differentiable in ``hidden`` and ``weight``.

    ``chunk_size`` tokens are processed at a time (peak extra memory about ``chunk_size × V``
    floats); ``softcap`` applies ``softcap * tanh(z / softcap)`` to the logits first. ``backend``:
    ``"auto" | "triton" | "torch" | "reference"``. Raises `ValueError` on mismatched shapes, dtypes or
    devices, non-integer or out-of-range labels, an unknown reduction, or a bad chunk size.
    """
    _check(hidden, weight, labels, ignore_index, reduction, chunk_size, softcap)
    impl = resolve_backend(backend, hidden.device, "linear_cross_entropy", supported=_SUPPORTED)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    labels1 = labels.reshape(-1).long()
    if impl == "reference":
        loss = linear_cross_entropy_reference(hidden2, weight, labels1, ignore_index, softcap)
        n_tokens = (labels1 != ignore_index).sum()
        if reduction == "mean":
            loss = loss / n_tokens.clamp(min=1).to(loss.dtype)
        return loss, n_tokens
    grad_on = torch.is_grad_enabled()
    if impl == "triton":  # triton is imported only when its kernel runs
        from lsts.kernels.loss.triton import ce_chunk
    else:
        from lsts.kernels.loss.cpu import ce_chunk
    return _LinearCrossEntropyFunction.apply(
        hidden2.contiguous(), weight, labels1.contiguous(), int(ignore_index), reduction == "mean", chunk_size,
        None if softcap is None else float(softcap), ce_chunk, grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )  # fmt: skip
