"""Triton kernels of SPT: top-L key selection by code collisions, sparse attention forward and
backward over the selected keys, and the grouped GEMM of the routed FFN.

- `select_keys`: one program per (query block, batch·head). Pass 1 streams the causal key blocks and
  builds each query's histogram of collision scores (``0..S``); the threshold score ``t`` and the
  number of ties to keep follow from its suffix sums. Pass 2 streams the key blocks backwards and
  writes, in descending position, every key above ``t`` and the latest ties up to the budget: the
  exact top-L of `sparse_attention.select_keys_reference` (ties to the later key), with O(BLOCK)
  on-chip state, no ``[N, N]`` anywhere.
- `sparse_attention_fwd` / `_bwd`: one program per (query block, batch·head); per slot block the keys
  are gathered by index (``[BLOCK_M, BLOCK_L, BLOCK_D]``), the logits clamped, ``exp(s - c)`` summed
  (the clamp bounds the logits, so one pass, no running max). Backward recomputes P from ``lse``,
  accumulates dQ in registers and scatters dK / dV with float32 atomics (order-dependent rounding on
  GPU, like every atomic-accumulating attention backward).
- `grouped_mm`: rows sorted by block; each program owns a tile of one block's rows (a host-built
  tile table) and a tile of output columns, gathers its input rows through ``src`` and multiplies by
  that block's weight (any strides: Linear weights are used as views). Its autograd backward is the
  same kernel on the transposed weights plus `_grouped_wgrad_kernel` (per block ``Xᵀ dY``).

Runs compiled on CUDA and in Triton's interpreter on CPU (fp32 / fp16) for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsts.kernels.buffers import kernel_buffer, kernel_buffer_like

# ------------------------------------------------------------------------------------ selection


@triton.jit
def _collisions(b_qc, p_kc0, stride_kcs, offs_n, offs_s, offs_m, N, N_SUB: tl.constexpr):
    """[BLOCK_M, BLOCK_N] collision counts of a key block, -1 where the key is not causal / real."""
    m_n, m_s = offs_n < N, offs_s < N_SUB
    b_kc = tl.load(
        p_kc0 + offs_n[:, None].to(tl.int64) * stride_kcs + offs_s[None, :], mask=m_n[:, None] & m_s[None, :], other=0
    )  # [BLOCK_N, BLOCK_SUB]
    same = (b_qc[:, None, :] == b_kc[None, :, :]) & m_s[None, None, :]
    score = tl.sum(same.to(tl.int32), axis=2)
    valid = (offs_n[None, :] <= offs_m[:, None]) & m_n[None, :]
    return tl.where(valid, score, -1)


@triton.jit
def _select_kernel(
    QC, KC, IDX,
    stride_qcb, stride_qcs, stride_qch, stride_kcb, stride_kcs, stride_kch,
    N, H, GQA, L,
    N_SUB: tl.constexpr, BLOCK_SUB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_sub = tl.arange(0, BLOCK_SUB)
    offs_s = tl.arange(0, BLOCK_S)  # histogram bins: scores 0..N_SUB
    m_m = offs_m < N
    p_qc = QC + i_b.to(tl.int64) * stride_qcb + i_h * stride_qch + offs_m[:, None].to(tl.int64) * stride_qcs
    b_qc = tl.load(p_qc + offs_sub[None, :], mask=m_m[:, None] & (offs_sub[None, :] < N_SUB), other=0)
    p_kc0 = KC + i_b.to(tl.int64) * stride_kcb + (i_h // GQA) * stride_kch
    hi = tl.minimum(i_m * BLOCK_M + BLOCK_M, N)  # causal: no query of the block sees a key >= hi
    n_blocks = tl.cdiv(hi, BLOCK_N)

    b_hist = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.int32)
    for i_blk in range(0, n_blocks):
        offs_n = i_blk * BLOCK_N + tl.arange(0, BLOCK_N)
        score = _collisions(b_qc, p_kc0, stride_kcs, offs_n, offs_sub, offs_m, N, N_SUB)
        b_hist += tl.sum((score[:, :, None] == offs_s[None, None, :]).to(tl.int32), axis=1)
    # ge[v] = keys scoring >= v; t = the highest v with ge[v] >= L (0: fewer keys than L, keep all)
    b_ge = tl.sum(tl.where(offs_s[None, None, :] >= offs_s[None, :, None], b_hist[:, None, :], 0), axis=2)
    b_t = tl.max(tl.where((b_ge >= L) & (offs_s[None, :] <= N_SUB), offs_s[None, :], 0), axis=1)
    b_need = L - tl.sum(tl.where(offs_s[None, :] == b_t[:, None] + 1, b_ge, 0), axis=1)  # ties to keep

    p_idx = IDX + (i_bh.to(tl.int64) * N + offs_m[:, None].to(tl.int64)) * L
    b_written = tl.zeros([BLOCK_M], dtype=tl.int32)
    b_ties_seen = tl.zeros([BLOCK_M], dtype=tl.int32)
    for i_blk in range(0, n_blocks):  # latest keys first: the ties kept are the nearest
        offs_n = (n_blocks - 1 - i_blk) * BLOCK_N + BLOCK_N - 1 - tl.arange(0, BLOCK_N)
        score = _collisions(b_qc, p_kc0, stride_kcs, offs_n, offs_sub, offs_m, N, N_SUB)
        tie = score == b_t[:, None]
        tie_rank = b_ties_seen[:, None] + tl.cumsum(tie.to(tl.int32), axis=1)
        take = (score > b_t[:, None]) | (tie & (tie_rank <= b_need[:, None]))
        slot = b_written[:, None] + tl.cumsum(take.to(tl.int32), axis=1) - 1
        tl.store(p_idx + slot, offs_n[None, :] + tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32), mask=take & m_m[:, None])
        b_written += tl.sum(take.to(tl.int32), axis=1)
        b_ties_seen += tl.sum(tie.to(tl.int32), axis=1)


def select_keys(q_codes: torch.Tensor, k_codes: torch.Tensor, budget: int) -> torch.Tensor:
    """``idx [B, H, N, L]`` int32 (see `sparse_attention.select_keys`)."""
    q_codes, k_codes = q_codes.contiguous(), k_codes.contiguous()
    b, n, h, n_sub = q_codes.shape
    idx = torch.full((b, h, n, budget), -1, dtype=torch.int32, device=q_codes.device)
    block = 32 if q_codes.is_cuda else 16
    grid = (triton.cdiv(n, block), b * h)
    _select_kernel[grid](
        q_codes, k_codes, idx, *q_codes.stride()[:3], *k_codes.stride()[:3], n, h, h // k_codes.shape[2], budget,
        N_SUB=n_sub, BLOCK_SUB=max(2, triton.next_power_of_2(n_sub)), BLOCK_S=triton.next_power_of_2(n_sub + 2),
        BLOCK_M=block, BLOCK_N=block,
    )  # fmt: skip
    return idx


# ------------------------------------------------------------------------------ sparse attention


@triton.jit
def _gather_rows(p_x0, stride_s, b_idx, keep, offs_d, m_d):
    """[BLOCK_M, BLOCK_L, BLOCK_D] rows ``b_idx`` of one head (0 where not kept), as float32."""
    safe = tl.where(keep, b_idx, 0).to(tl.int64)
    p = p_x0 + safe[:, :, None] * stride_s + offs_d[None, None, :]
    return tl.load(p, mask=keep[:, :, None] & m_d[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def _query_rows(N, H, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program that owns a block of queries works on: its (batch, head), the query rows, the
    slot and feature offsets, and the row and feature masks."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return i_bh, i_bh // H, i_bh % H, offs_m, tl.arange(0, BLOCK_L), offs_d, offs_m < N, offs_d < HEAD_DIM


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, IDX, O, LSE,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_ob, stride_os, stride_oh,
    N, H, GQA, L, scale, clamp, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """K and V share strides."""
    i_bh, i_b, i_h, offs_m, offs_l, offs_d, m_m, m_d = _query_rows(N, H, HEAD_DIM, BLOCK_M, BLOCK_L, BLOCK_D)
    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs
    b_q = tl.load(p_q + offs_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    kv0 = i_b.to(tl.int64) * stride_kb + (i_h // GQA) * stride_kh
    p_idx = IDX + (i_bh.to(tl.int64) * N + offs_m[:, None].to(tl.int64)) * L
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        m_l = start + offs_l < L
        b_idx = tl.load(p_idx + start + offs_l[None, :], mask=m_m[:, None] & m_l[None, :], other=-1)  # [BM, BL]
        keep = b_idx >= 0
        b_k = _gather_rows(K + kv0, stride_ks, b_idx, keep, offs_d, m_d)
        b_s = tl.minimum(tl.maximum(tl.sum(b_q[:, None, :] * b_k, axis=2) * scale, -clamp), clamp)
        b_p = tl.where(keep, tl.exp(b_s - clamp), 0.0)  # in [e^-2c, 1]: no running max needed
        b_l += tl.sum(b_p, axis=1)
        b_v = _gather_rows(V + kv0, stride_ks, b_idx, keep, offs_d, m_d)
        b_acc += tl.sum(b_p[:, :, None] * b_v, axis=1)
    seen = b_l > 0
    b_out = b_acc / tl.where(seen, b_l, 1.0)[:, None]
    b_lse = tl.where(seen, clamp + tl.log(tl.where(seen, b_l, 1.0)), float("-inf"))
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os
    tl.store(p_o + offs_d[None, :], b_out.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(LSE + i_bh.to(tl.int64) * N + offs_m, b_lse, mask=m_m)


@triton.jit
def _sparse_bwd_kernel(
    Q, K, V, DO, IDX, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_dkb, stride_dks, stride_dkh,
    N, H, GQA, L, scale, clamp, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Q, DO and DQ share strides; K and V share strides; DK and DV (float32) share strides."""
    i_bh, i_b, i_h, offs_m, offs_l, offs_d, m_m, m_d = _query_rows(N, H, HEAD_DIM, BLOCK_M, BLOCK_L, BLOCK_D)
    m_md = m_m[:, None] & m_d[None, :]
    q_rows = i_b.to(tl.int64) * stride_qb + i_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    b_q = tl.load(Q + q_rows, mask=m_md, other=0.0).to(tl.float32)
    b_do = tl.load(DO + q_rows, mask=m_md, other=0.0).to(tl.float32)
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * N + offs_m, mask=m_m, other=0.0)
    b_lse = tl.where(b_lse == float("-inf"), 0.0, b_lse)  # rows without keys: P = 0 through the mask
    b_delta = tl.load(DELTA + i_bh.to(tl.int64) * N + offs_m, mask=m_m, other=0.0)
    kv0 = i_b.to(tl.int64) * stride_kb + (i_h // GQA) * stride_kh
    dkv0 = i_b.to(tl.int64) * stride_dkb + (i_h // GQA) * stride_dkh
    p_idx = IDX + (i_bh.to(tl.int64) * N + offs_m[:, None].to(tl.int64)) * L
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        m_l = start + offs_l < L
        b_idx = tl.load(p_idx + start + offs_l[None, :], mask=m_m[:, None] & m_l[None, :], other=-1)
        keep = b_idx >= 0
        b_k = _gather_rows(K + kv0, stride_ks, b_idx, keep, offs_d, m_d)
        b_v = _gather_rows(V + kv0, stride_ks, b_idx, keep, offs_d, m_d)
        b_raw = tl.sum(b_q[:, None, :] * b_k, axis=2) * scale  # [BM, BL]
        b_s = tl.minimum(tl.maximum(b_raw, -clamp), clamp)
        b_p = tl.where(keep, tl.exp(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.sum(b_do[:, None, :] * b_v, axis=2)
        b_ds = tl.where((b_raw >= -clamp) & (b_raw <= clamp), b_p * (b_dp - b_delta[:, None]), 0.0) * scale
        b_dq += tl.sum(b_ds[:, :, None] * b_k, axis=1)
        p_dkv = dkv0 + tl.where(keep, b_idx, 0).to(tl.int64)[:, :, None] * stride_dks + offs_d[None, None, :]
        m_kd = keep[:, :, None] & m_d[None, None, :]
        tl.atomic_add(DV + p_dkv, b_p[:, :, None] * b_do[:, None, :], mask=m_kd)
        tl.atomic_add(DK + p_dkv, b_ds[:, :, None] * b_q[:, None, :], mask=m_kd)
    tl.store(DQ + q_rows, b_dq.to(DQ.dtype.element_ty), mask=m_md)


def _attn_blocks(head_dim: int, device: torch.device) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    # [BLOCK_M, BLOCK_L, BLOCK_D] gathered tiles: keep them near 8K elements on GPU.
    block_l = max(4, 8192 // (16 * block_d)) if device.type == "cuda" else 16
    return {"BLOCK_M": 16, "BLOCK_L": block_l, "BLOCK_D": block_d}


def sparse_attention_fwd(q, k, v, idx, scale: float, clamp: float):
    """``(out [B, N, H, D], lse [B, H, N] float32)`` over the keys ``idx`` (contiguous int32)."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    b, n, h, d = q.shape
    out = kernel_buffer_like(q)  # NaN-poisoned under the tests: an unwritten row cannot pass one
    lse = kernel_buffer((b, h, n), torch.float32, q.device)
    blocks = _attn_blocks(d, q.device)
    _sparse_fwd_kernel[(triton.cdiv(n, blocks["BLOCK_M"]), b * h)](
        q, k, v, idx, out, lse, *q.stride()[:3], *k.stride()[:3], *out.stride()[:3],
        n, h, h // k.shape[2], idx.shape[-1], scale, clamp, d, **blocks,
    )  # fmt: skip
    return out, lse


def sparse_attention_bwd(dout, q, k, v, out, lse, idx, scale: float, clamp: float):
    """``(dq, dk, dv)`` given the forward's ``out`` and ``lse``."""
    q, k, v, dout = (x.contiguous() for x in (q, k, v, dout))
    b, n, h, d = q.shape
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, N]
    dq = kernel_buffer_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    blocks = _attn_blocks(d, q.device)
    _sparse_bwd_kernel[(triton.cdiv(n, blocks["BLOCK_M"]), b * h)](
        q, k, v, dout, idx, lse.float().contiguous(), delta, dq, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *dk.stride()[:3],
        n, h, h // k.shape[2], idx.shape[-1], scale, clamp, d, **blocks,
    )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------- grouped GEMM


@triton.jit
def _grouped_mm_kernel(
    X, SRC, TILE_BLOCK, TILE_ROW, OFFSETS, W, Y,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym,
    K, N,
    HAS_SRC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Y[r] = X[SRC[r]] @ W[e] for the rows r of one block e (a tile from the host's tile table)."""
    i_t, i_n = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(TILE_BLOCK + i_t)
    row0 = tl.load(TILE_ROW + i_t)
    row_end = tl.load(OFFSETS + i_e + 1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_m, m_n = offs_m < row_end, offs_n < N
    rows = offs_m
    if HAS_SRC:
        rows = tl.load(SRC + offs_m, mask=m_m, other=0)
    p_x = X + rows[:, None].to(tl.int64) * stride_xm
    p_w = W + i_e.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        m_k = k0 + offs_k < K
        b_x = tl.load(p_x + (k0 + offs_k[None, :]) * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(p_w + (k0 + offs_k[:, None]) * stride_wk, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_acc += tl.dot(b_x, b_w)  # [BLOCK_M, BLOCK_N]
    p_y = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(p_y, b_acc.to(Y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    X, SRC, DY, OFFSETS, DW,
    stride_xm, stride_xk, stride_dym, stride_dwe, stride_dwk,
    K, N,
    HAS_SRC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """DW[e] = X[SRC[rows of e]]ᵀ @ DY[rows of e], float32."""
    i_k, i_n, i_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0, row_end = tl.load(OFFSETS + i_e), tl.load(OFFSETS + i_e + 1)
    offs_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_k, m_n = offs_k < K, offs_n < N
    b_acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(row0, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_m = offs_m < row_end
        rows = offs_m
        if HAS_SRC:
            rows = tl.load(SRC + offs_m, mask=m_m, other=0)
        p_x = X + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        p_dy = DY + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :]
        b_dy = tl.load(p_dy, mask=m_m[:, None] & m_n[None, :], other=0.0)  # [BM, BN]
        b_acc += tl.dot(tl.trans(b_x), b_dy)
    p_dw = DW + i_e.to(tl.int64) * stride_dwe + offs_k[:, None].to(tl.int64) * stride_dwk + offs_n[None, :]
    tl.store(p_dw, b_acc, mask=m_k[:, None] & m_n[None, :])


def _gemm_blocks(device: torch.device) -> dict:
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32} if device.type == "cuda" else {
        "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}  # fmt: skip


def _tiles(offsets: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile table: block and first row of every ``block_m``-row tile of every block."""
    blocks, rows = [], []
    for e in range(len(offsets) - 1):
        for r in range(offsets[e], offsets[e + 1], block_m):
            blocks.append(e)
            rows.append(r)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(blocks), as_tensor(rows)


def grouped_mm_fwd(x: torch.Tensor, w: torch.Tensor, src: torch.Tensor | None, offsets: list[int]) -> torch.Tensor:
    """``y [R, N]``: row r of block e is ``x[src[r]] @ w[e]`` (``src`` None: ``x[r]``); ``w [E, K, N]``."""
    rows, n = offsets[-1], w.shape[2]
    y = kernel_buffer((rows, n), x.dtype, x.device)
    if rows == 0:
        return y
    blocks = _gemm_blocks(x.device)
    tile_block, tile_row = _tiles(offsets, blocks["BLOCK_M"], x.device)
    off = torch.tensor(offsets, dtype=torch.int32, device=x.device)
    _grouped_mm_kernel[(tile_block.numel(), triton.cdiv(n, blocks["BLOCK_N"]))](
        x, src, tile_block, tile_row, off, w, y, *x.stride(), *w.stride(), y.stride(0), w.shape[1], n,
        HAS_SRC=src is not None, **blocks,
    )  # fmt: skip
    return y


def grouped_wgrad(x: torch.Tensor, src: torch.Tensor | None, dy: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """``dw [E, K, N]`` (float32): ``dw[e] = x[src[rows of e]]ᵀ @ dy[rows of e]``."""
    e, k, n = len(offsets) - 1, x.shape[1], dy.shape[1]
    dw = torch.zeros((e, k, n), dtype=torch.float32, device=x.device)
    if offsets[-1] == 0:
        return dw
    dy = dy.contiguous()
    blocks = _gemm_blocks(x.device)
    off = torch.tensor(offsets, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(k, blocks["BLOCK_K"]), triton.cdiv(n, blocks["BLOCK_N"]), e)
    _grouped_wgrad_kernel[grid](
        x, src, dy, off, dw, *x.stride(), dy.stride(0), *dw.stride()[:2], k, n, HAS_SRC=src is not None, **blocks
    )
    return dw


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, src, offsets):
        ctx.save_for_backward(x, w, src)
        ctx.offsets = offsets
        return grouped_mm_fwd(x, w, src, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, src = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx_rows = grouped_mm_fwd(dy.contiguous(), w.transpose(1, 2), None, ctx.offsets)
            dx = dx_rows if src is None else torch.zeros_like(x).index_add_(0, src, dx_rows)
        if ctx.needs_input_grad[1]:
            dw = grouped_wgrad(x, src, dy, ctx.offsets).to(w.dtype)
        return dx, dw, None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, src: torch.Tensor | None, offsets: list[int]) -> torch.Tensor:
    """Differentiable `grouped_mm_fwd` (in ``x`` and ``w``)."""
    return _GroupedMM.apply(x, w, src, offsets)


__all__ = ["grouped_mm", "grouped_wgrad", "select_keys", "sparse_attention_bwd", "sparse_attention_fwd"]
