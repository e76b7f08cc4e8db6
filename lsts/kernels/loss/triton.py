"""Triton kernel of the chunked cross-entropy (`lsts.kernels.loss`): per row of a logits chunk, the
loss and, in place, the logits' gradient. Imported only when the ``triton`` backend runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsts.kernels.buffers import kernel_buffer

_MAX_BLOCK_V = 4096  # vocabulary block of the kernel: 16 KiB of float32 per program, enough to hide latency


@triton.jit
def _tanh(x):
    # tl has no tanh that also runs in the interpreter; this form saturates to ±1 without NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _ce_chunk_kernel(
    z, labels, loss, stride_z, V, ignore_index, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr
):
    # One program per token: reads its row of logits, writes its loss and, over the same row, dloss/dlogits.
    i_c = tl.program_id(0).to(tl.int64)
    p_z = z + i_c * stride_z
    b_y = tl.load(labels + i_c)
    b_valid = b_y != ignore_index
    b_y = tl.where(b_valid, b_y, 0)  # an ignored row still reads a real column; its results are zeroed

    # Pass 1: online max and sum of exponentials over the vocabulary blocks.
    b_m = float("-inf")
    b_s = 0.0
    for i_v in range(0, V, BLOCK_V):
        o_v = i_v + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_z + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BLOCK_V]
        if HAS_SOFTCAP:
            b_z = softcap * _tanh(b_z / softcap)
        b_z = tl.where(m_v, b_z, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_z, axis=0))
        b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_z - b_m_new), axis=0)
        b_m = b_m_new
    b_lse = b_m + tl.log(b_s)

    b_zy = tl.load(p_z + b_y).to(tl.float32)
    if HAS_SOFTCAP:
        b_zy = softcap * _tanh(b_zy / softcap)
    tl.store(loss + i_c, tl.where(b_valid, b_lse - b_zy, 0.0).to(loss.dtype.element_ty))

    # Pass 2: dlogits = softmax - onehot (times the soft-cap's derivative), in place; zero when ignored.
    for i_v in range(0, V, BLOCK_V):
        o_v = i_v + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_z + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BLOCK_V]
        if HAS_SOFTCAP:
            b_t = _tanh(b_z / softcap)
            b_z = softcap * b_t
        b_p = tl.exp(b_z - b_lse)
        b_dz = tl.where(o_v == b_y, b_p - 1.0, b_p)
        if HAS_SOFTCAP:
            b_dz = b_dz * (1.0 - b_t * b_t)
        b_dz = tl.where(b_valid, b_dz, 0.0)
        tl.store(p_z + o_v, b_dz.to(z.dtype.element_ty), mask=m_v)


def ce_chunk(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None) -> torch.Tensor:
    """Per-token loss ``[C]`` of logits ``z [C, V]``; overwrites ``z`` with dloss/dlogits."""
    rows, vocab = z.shape
    loss = kernel_buffer((rows,), z.dtype, z.device)
    block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
    _ce_chunk_kernel[(rows,)](
        z, labels, loss, z.stride(0), vocab, ignore_index, 1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )  # fmt: skip
    return loss
