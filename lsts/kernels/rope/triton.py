"""Triton kernel of RoPE (`lsts.kernels.rope`): one rotation kernel for forward (``sign=1``) and
backward (``sign=-1``). Imported only when the ``triton`` backend runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsts.kernels.buffers import kernel_buffer


@triton.jit
def _rope_kernel(
    x, pos, inv_freq, y,
    stride_xb, stride_xs, stride_xh, stride_yb, stride_ys, stride_yh, stride_pb, stride_ps,
    S, H, HALF,
    SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    # One program per (token, block of heads): cos / sin are computed once and shared by the heads.
    i_bs, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_b, i_s = i_bs // S, i_bs % S
    o_f = tl.arange(0, BLOCK_F)
    m_f = o_f < HALF
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H

    b_pos = tl.load(pos + i_b * stride_pb + i_s * stride_ps).to(tl.float32)
    b_inv = tl.load(inv_freq + o_f, mask=m_f, other=0.0)  # [BLOCK_F]
    b_ang = b_pos * b_inv  # [BLOCK_F]
    b_cos = tl.cos(b_ang)  # [BLOCK_F]
    b_sin = SIGN * tl.sin(b_ang)  # [BLOCK_F]; SIGN = -1 rotates back (the backward)

    m_hf = m_h[:, None] & m_f[None, :]
    p_x1 = x + i_b * stride_xb + i_s * stride_xs + o_h[:, None] * stride_xh + o_f[None, :]  # [BLOCK_H, BLOCK_F]
    b_x1 = tl.load(p_x1, mask=m_hf, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_F]
    b_x2 = tl.load(p_x1 + HALF, mask=m_hf, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_F]
    b_y1 = b_x1 * b_cos[None, :] - b_x2 * b_sin[None, :]
    b_y2 = b_x2 * b_cos[None, :] + b_x1 * b_sin[None, :]

    p_y1 = y + i_b * stride_yb + i_s * stride_ys + o_h[:, None] * stride_yh + o_f[None, :]  # [BLOCK_H, BLOCK_F]
    tl.store(p_y1, b_y1.to(y.dtype.element_ty), mask=m_hf)
    tl.store(p_y1 + HALF, b_y2.to(y.dtype.element_ty), mask=m_hf)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """Triton launcher: ``x [B, S, H, D]`` rotated by ``sign * positions [B, S] * inv_freq [D / 2]``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, S, H, D = x.shape
    y = kernel_buffer((B, S, H, D), x.dtype, x.device)
    if y.numel() == 0:
        return y
    block_f = triton.next_power_of_2(D // 2)
    # Bound the [BLOCK_H, BLOCK_F] tile (registers on a GPU); more heads get more programs.
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // block_f))
    grid = (B * S, triton.cdiv(H, block_h))
    _rope_kernel[grid](
        x, positions, inv_freq, y,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        positions.stride(0), positions.stride(1),
        S, H, D // 2,
        SIGN=float(sign), BLOCK_H=block_h, BLOCK_F=block_f,
    )  # fmt: skip
    return y


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(positions, inv_freq)
        return rope_rotate(x, positions, inv_freq, sign=1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        positions, inv_freq = ctx.saved_tensors
        # A rotation's transpose is the rotation by the negative angle: nothing of x is needed.
        return rope_rotate(dy, positions, inv_freq, sign=-1), None, None
