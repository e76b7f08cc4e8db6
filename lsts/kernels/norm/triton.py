"""Triton kernels of RMSNorm (`lsts.kernels.norm`): forward per row, backward with per-program
``dweight`` partial sums. Imported only when the ``triton`` backend runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsts.kernels.buffers import kernel_buffer


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


class RMSNormFunction(torch.autograd.Function):
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
