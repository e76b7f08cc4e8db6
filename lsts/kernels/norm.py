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
import triton
import triton.language as tl
from torch import nn

from lsts.kernels.backend import BACKENDS, resolve_backend
from lsts.kernels.buffers import kernel_buffer

MAX_DIM = 65536  # one row per block: beyond this Triton's block would not fit in registers
_SUPPORTED = ("triton", "torch", "reference")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


# --- Triton kernels -------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(x, w, y, rstd, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D

    p_x = x + i_r * stride_x + o_d
    b_x = tl.load(p_x, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / D + eps)
    # Llama order: round the normalized row to the activation dtype before the weight multiplies it.
    b_n = (b_x * b_rstd).to(y.dtype.element_ty).to(tl.float32)  # [BLOCK_D]
    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]

    tl.store(y + i_r * stride_y + o_d, (b_n * b_w).to(y.dtype.element_ty), mask=m_d)
    tl.store(rstd + i_r, b_rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    x, w, dy, rstd, dx, dw_partial, stride_x, stride_dy, stride_dx, N_ROWS, D, BLOCK_D: tl.constexpr
):
    # A fixed number of programs stride over the rows, so dweight needs only one partial row each.
    # int64 start: the compiled loop variable then is int64 (the interpreter gives Python ints).
    i_p = tl.program_id(0).to(tl.int64)
    n_p = tl.num_programs(0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D

    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    b_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i_r in range(i_p, N_ROWS, n_p):
        b_x = tl.load(x + i_r * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
        b_dy = tl.load(dy + i_r * stride_dy + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
        b_rstd = tl.load(rstd + i_r)

        b_nh = b_x * b_rstd  # [BLOCK_D] normalized row, float32
        b_dn = b_dy * b_w  # [BLOCK_D]
        # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n)); masked lanes are zero in both.
        b_dx = b_rstd * (b_dn - b_nh * (tl.sum(b_dn * b_nh, axis=0) / D))
        tl.store(dx + i_r * stride_dx + o_d, b_dx.to(dx.dtype.element_ty), mask=m_d)
        # The weight multiplied the rounded row in the forward, so its gradient sees the same rounding.
        b_dw += b_dy * b_nh.to(x.dtype.element_ty).to(tl.float32)

    tl.store(dw_partial + i_p * D + o_d, b_dw, mask=m_d)


# --- launchers ------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` as ``[rows, d]`` with a unit stride along ``d`` (the kernels assume it)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _n_programs(rows: int, device: torch.device) -> int:
    """Programs of the backward: enough to fill the GPU once, few under the interpreter."""
    if device.type == "cuda":
        return min(rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``x [..., d]``, ``weight [d]`` -> ``y [..., d]`` (x.dtype), ``rstd [rows]`` (float32)."""
    x2 = _rows(x)
    rows, d = x2.shape
    y = kernel_buffer((rows, d), x.dtype, x.device)
    rstd = kernel_buffer((rows,), torch.float32, x.device)
    if rows > 0:
        _rms_norm_fwd_kernel[(rows,)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), d, eps, BLOCK_D=triton.next_power_of_2(d)
        )
    return y.view(x.shape), rstd


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: ``dx [..., d]`` (x.dtype) and ``dweight [d]`` (weight.dtype)."""
    x2, dy2 = _rows(x), _rows(dy)
    rows, d = x2.shape
    dx = kernel_buffer((rows, d), x.dtype, x.device)
    if rows == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    n_p = _n_programs(rows, x.device)
    dw_partial = kernel_buffer((n_p, d), torch.float32, x.device)
    _rms_norm_bwd_kernel[(n_p,)](
        x2, weight, dy2, rstd, dx, dw_partial, x2.stride(0), dy2.stride(0), dx.stride(0), rows, d,
        BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd)
        return dx, dw, None


# --- PyTorch backends -----------------------------------------------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch ops, differentiated by autograd; statistic in float32 (float64 for float64 input)."""
    xa = x.to(_acc_dtype(x.dtype))
    rstd = torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps)
    return ((xa * rstd).to(x.dtype) * weight).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The formula as written; with float64 input every step is float64."""
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    normed = xa / torch.sqrt((xa * xa).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return (normed.to(x.dtype).to(acc) * weight.to(acc)).to(x.dtype)


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
        return _RMSNormFunction.apply(x, weight, float(eps))
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
