"""RMSNorm: ``y = weight * (x / sqrt(mean(x², -1) + eps))`` over the last dim, in three backends.

Convention (Llama's, as ``LlamaRMSNorm`` in Hugging Face transformers): the statistic and the
normalization run in float32 (float64 for float64 input), the normalized activations are rounded to
``x.dtype``, and only then multiplied by ``weight``; the product is returned in ``x.dtype``. So a
model trained with transformers' RMSNorm sees the same rounding here. ``weight`` may be in another
dtype than ``x`` (e.g. float32 master weights with float16 activations); the output stays in
``x.dtype`` (where transformers would return the wider dtype) and ``dweight`` comes back in the
weight's dtype.

Backends (chosen by argument, see `lsts.kernels.backend`):

- ``triton``: one program per row forward, which also saves ``rstd [rows]`` in float32; the backward
  recomputes the normalized row from ``x`` and ``rstd``, writes ``dx`` per row and accumulates
  ``dweight`` in per-program float32 partial sums (a fixed set of programs strides over the rows),
  reduced by one ``sum`` afterwards: deterministic, no atomics.
- ``torch``: the same math as PyTorch ops, differentiated by autograd (saves float32 intermediates:
  simple, not memory-lean).
- ``reference``: the formula as written, float64-capable; the oracle of the tests.

Sources: Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019); the Llama rounding order
as transformers implements it. Limits: the Triton kernels hold a whole row in one block, so
``d <= 65536``; gradients are through the rounding to ``x.dtype`` as if it were the identity (as
autograd does for a dtype cast).
"""

from __future__ import annotations

import torch
from torch import nn

from lsts.kernels.backend import BACKENDS, resolve_backend
from lsts.kernels.norm.cpu import rms_norm_torch
from lsts.kernels.norm.reference import rms_norm_reference

MAX_DIM = 65536  # one row per block: beyond this Triton's block would not fit in registers
_SUPPORTED = ("triton", "torch", "reference")


# --- public API -----------------------------------------------------------------------------------


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"rms_norm needs a floating-point x [..., d], got {tuple(x.shape)} {x.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm weight must be [d] = [{x.shape[-1]}] to match x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"rms_norm weight must be floating-point, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm weight is on {weight.device} but x on {x.device}; move them to one device")
    if not eps >= 0.0:  # also rejects NaN
        raise ValueError(f"rms_norm eps must be >= 0, got {eps}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim: ``x [..., d]``, ``weight [d]`` -> ``y [..., d]`` in ``x.dtype``.

    ``y = (x / sqrt(mean(x², -1) + eps)).to(x.dtype) * weight``, the statistic in float32 (Llama's
    order, see the module docstring). ``backend``: ``"auto" | "triton" | "torch" | "reference"``.
    Raises `ValueError` for a weight that is not ``[d]``, devices that differ, or a negative ``eps``.
    """
    _check(x, weight, eps)
    impl = resolve_backend(backend, x.device, "rms_norm", supported=_SUPPORTED)
    if impl == "triton":
        if x.shape[-1] > MAX_DIM:
            raise ValueError(f"rms_norm triton holds a row in one block: d = {x.shape[-1]} > {MAX_DIM}; use 'torch'")
        from lsts.kernels.norm.triton import RMSNormFunction  # triton is imported only when its kernels run

        return RMSNormFunction.apply(x, weight, float(eps))
    if impl == "torch":
        return rms_norm_torch(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm layer with a learned ``weight [dim]`` (ones at init); ``backend`` is fixed at construction."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm dim must be >= 1, got {dim}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown RMSNorm backend {backend!r}; choose one of {BACKENDS}")
        self.dim, self.eps, self.backend = dim, eps, backend
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, backend={self.backend!r}"
