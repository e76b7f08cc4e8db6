"""The compile report's anchor: a minimal causal FlashAttention-2 forward, the structure of the Triton
tutorial's (one block of queries per program, key blocks below the diagonal without a mask, the
diagonal block with one, online softmax in base 2), with none of lsts's span, document, sink or
softcap machinery. Compiled at the tutorial's tiles (128 × 64, 8 warps) next to lsts's own forward, it
is the yardstick for what the plain causal path may cost in registers. It is never run by lsts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsts.kernels.attention.triton import LOG2E

BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES = 128, 64, 8, 3


@triton.jit
def _anchor_block(
    b_acc, b_m, b_l, b_q, p_k, p_v, offs_m, offs_n, offs_d, start, stride_s, qk_scale, DIAGONAL: tl.constexpr
):
    rows = (start + offs_n)[:, None] * stride_s + offs_d[None, :]
    b_k = tl.load(p_k + rows)
    b_v = tl.load(p_v + rows)
    b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
    if DIAGONAL:
        b_s = tl.where(offs_m[:, None] >= (start + offs_n)[None, :], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_acc, b_m_new, b_l


@triton.jit
def _anchor_fwd_kernel(
    Q, K, V, O, LSE, stride_bh, stride_s, S, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """``[B·H, S, D]`` contiguous, S a multiple of BLOCK_M (as the tutorial requires)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = i_bh.to(tl.int64) * stride_bh
    b_q = tl.load(Q + base + offs_m[:, None] * stride_s + offs_d[None, :])
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, i_m * BLOCK_M, BLOCK_N):  # below the diagonal: no mask
        b_acc, b_m, b_l = _anchor_block(
            b_acc, b_m, b_l, b_q, K + base, V + base, offs_m, offs_n, offs_d, start, stride_s, qk_scale, False
        )
    for start in range(i_m * BLOCK_M, (i_m + 1) * BLOCK_M, BLOCK_N):  # the diagonal block
        b_acc, b_m, b_l = _anchor_block(
            b_acc, b_m, b_l, b_q, K + base, V + base, offs_m, offs_n, offs_d, start, stride_s, qk_scale, True
        )
    tl.store(LSE + i_bh.to(tl.int64) * S + offs_m, (b_m + tl.log2(b_l)) / LOG2E)
    tl.store(O + base + offs_m[:, None] * stride_s + offs_d[None, :], (b_acc / b_l[:, None]).to(O.dtype.element_ty))


def anchor_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float):
    """``q, k, v [B, H, S, D]`` contiguous, S a multiple of 128 -> ``(out, lse)`` (causal)."""
    b, h, s, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    _anchor_fwd_kernel[(s // BLOCK_M, b * h)](
        q, k, v, out, lse, s * d, d, s, softmax_scale * LOG2E.value,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=d, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out, lse
