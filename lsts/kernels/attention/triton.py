"""Triton flash attention, forward and backward, with span masks at global offsets.

FlashAttention-2 scheme: each program owns a block of queries (forward, dQ) or of keys (dK/dV),
streams the other side through on-chip memory with an online softmax in base 2, never materializes
the score matrix, saves only ``out`` and ``lse``, and recomputes probabilities in backward. Only the
key (query) blocks that a span can reach are visited, so work is proportional to the unmasked area:
a window or group span costs O(N·w), not O(N²).

Masks are the predicate of `spans.Span` at global positions ``q_offset + i`` / ``k_offset + j``:
causal (``j <= i``), window (``i - j < WINDOW``), group (``(i+s)//GROUP == (j+s)//GROUP`` with the
shift ``s = GROUP/2`` on the heads from ``SHIFT_FROM`` on, by default the second half, when
``SHIFT_HEADS``) or a sink (``j < N_SINK``). ``SOFTCAP`` > 0 caps the scaled scores,
``SOFTCAP·tanh(s / SOFTCAP)`` (Gemma2), and multiplies dS by ``1 - tanh²`` in the backward; it is a
constexpr, so the uncapped kernels are the same code as without it. Layout ``[B, S, H, D]`` with the last dim
contiguous; GQA maps query head h to K/V head ``h // (H / H_kv)``. Accumulation in fp32; ``lse``
is fp32 ``[B, H, Sq]`` (natural log).

Register budget: the plain spans (causal or full: no window, group, sinks or documents) visit first
the key blocks that every query of the program sees whole (below the causal diagonal, inside the
sequence) without building a mask, then the rest with one; the sinks get a loop of their own behind
their constexpr, and whole head-dim tiles load without a feature mask. The CUDA tiles, warps and
stages come from a table per kernel, head dim, dtype and architecture (`launch_config`) whose every
entry the compile report (`lsts.kernels.compile_report`) shows spilling nothing at D <= 128.

Runs compiled on CUDA and, for the tests, in Triton's interpreter on CPU (fp32 / fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsts.kernels.attention.spans import Span
from lsts.kernels.buffers import kernel_buffer

# log2(e): the kernels run the softmax in base 2 (exp2 / log2). A `tl.constexpr` so that @triton.jit
# functions may read it; host code takes ``LOG2E.value``.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _keep(
    pos_q,
    pos_k,
    shift,
    doc_lo,
    doc_hi,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    N_SINK: tl.constexpr,
    DOCS: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] boolean: may query position pos_q see key position pos_k. With DOCS the
    key must also lie in the query's document [doc_lo, doc_hi) (per query row)."""
    keep = pos_k[None, :] >= 0
    if CAUSAL:
        keep = keep & (pos_k[None, :] <= pos_q[:, None])
    if WINDOW > 0:
        keep = keep & (pos_q[:, None] - pos_k[None, :] < WINDOW)
    if GROUP > 0:
        same = (pos_q[:, None] + shift) // GROUP == (pos_k[None, :] + shift) // GROUP
        keep = keep & (same | (pos_k[None, :] < N_SINK))
    if DOCS:
        keep = keep & (pos_k[None, :] >= doc_lo[:, None]) & (pos_k[None, :] < doc_hi[:, None])
    return keep


@triton.jit
def _doc_bounds(DOC_START, DOC_END, pos, mask, DOCS: tl.constexpr):
    """Per-position document bounds (global), or zeros that `_keep` ignores without DOCS."""
    doc_lo = 0
    doc_hi = 0
    if DOCS:
        doc_lo = tl.load(DOC_START + pos, mask=mask, other=0)
        doc_hi = tl.load(DOC_END + pos, mask=mask, other=0)
    return doc_lo, doc_hi


@triton.jit
def _key_bounds(
    q_first,
    q_last,
    shift,
    k_offset,
    SK,
    DOC_START,
    DOC_END,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    N_SINK: tl.constexpr,
    DOCS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Local key blocks to visit for queries q_first..q_last (global): sinks [0, sink_hi), then
    [lo, hi). lo is aligned down to BLOCK_N; the sink range stops where the main range starts."""
    lo = 0
    hi = SK
    if CAUSAL:
        hi = tl.minimum(hi, q_last - k_offset + 1)
    if WINDOW > 0:
        lo = tl.maximum(lo, q_first - WINDOW + 1 - k_offset)
    if GROUP > 0:
        lo = tl.maximum(lo, (q_first + shift) // GROUP * GROUP - shift - k_offset)
        hi = tl.minimum(hi, ((q_last + shift) // GROUP + 1) * GROUP - shift - k_offset)
    if DOCS:  # the documents of the first and the last query bound the keys
        lo = tl.maximum(lo, tl.load(DOC_START + q_first) - k_offset)
        hi = tl.minimum(hi, tl.load(DOC_END + q_last) - k_offset)
    lo = lo // BLOCK_N * BLOCK_N
    sink_hi = tl.minimum(tl.minimum(N_SINK - k_offset, SK), lo)
    return lo, hi, sink_hi


@triton.jit
def _tile(p_base, start, offs_rows, offs_d, stride):
    """Pointers to the [rows, BLOCK_D] tile of rows start + offs_rows, with 64-bit row offsets (long
    sequences overflow 32 bits; a 64-bit block start plus 32-bit offsets took more registers on sm_90)."""
    return p_base + (start + offs_rows)[:, None].to(tl.int64) * stride + offs_d[None, :]


@triton.jit
def _load_rows(ptrs, m_rows, offs_d, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, masking the rows (when MASKED) and the features past HEAD_DIM
    (when it is not a power of two): a whole tile loads without a mask."""
    if offs_d.shape[0] != HEAD_DIM:
        m_d = offs_d < HEAD_DIM
        if MASKED:
            tile = tl.load(ptrs, mask=m_rows[:, None] & m_d[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=m_d[None, :], other=0.0)
    elif MASKED:
        tile = tl.load(ptrs, mask=m_rows[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _whole_blocks_end(lo, limit, BLOCK: tl.constexpr):
    """End of the run of whole blocks from lo on that stay below limit (lo when there is none)."""
    return lo + tl.maximum(limit - lo, 0) // BLOCK * BLOCK


@triton.jit
def _scores(b_qk, qk_scale, SOFTCAP: tl.constexpr):
    """Base-2 scores from ``q·k`` (``qk_scale = scale·log2 e``) and, with SOFTCAP, the tanh of the
    cap, ``s = SOFTCAP·tanh(scale·q·k / SOFTCAP)``, that the backward's ``1 - tanh²`` needs (without
    SOFTCAP the second value is unused and compiled away)."""
    b_s = b_qk * qk_scale
    b_t = b_qk
    if SOFTCAP > 0:
        # tanh(x) = 1 - 2 / (e^{2x} + 1): saturates to ±1 without overflow (Triton has no tanh).
        b_x2 = b_qk * (qk_scale * 2 / SOFTCAP)  # 2x in base 2: 2·scale·q·k·log2(e) / SOFTCAP
        b_t = 1 - 2 / (tl.exp2(b_x2) + 1)
        b_s = b_t * (SOFTCAP * LOG2E)
    return b_s, b_t


@triton.jit
def _fwd_blocks(
    b_acc, b_m, b_l, b_q, p_k0, p_v0, stride_ks, stride_vs, pos_q, doc_lo, doc_hi, offs_n, offs_d, first, end,
    shift, k_offset, SK, HEAD_DIM: tl.constexpr, qk_scale,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, N_SINK: tl.constexpr, DOCS: tl.constexpr,
    SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The key blocks [first, end) of the online softmax (base 2). Without MASKED the blocks are whole
    (every key exists and every query of the block sees it): no mask is built and every row's maximum
    is finite."""
    for start in range(first, end, offs_n.shape[0]):
        offs_k = start + offs_n
        m_k = offs_k < SK
        b_k = _load_rows(_tile(p_k0, start, offs_n, offs_d, stride_ks), m_k, offs_d, HEAD_DIM, MASKED)
        b_v = _load_rows(_tile(p_v0, start, offs_n, offs_d, stride_vs), m_k, offs_d, HEAD_DIM, MASKED)
        b_s, _ = _scores(tl.dot(b_q, tl.trans(b_k)), qk_scale, SOFTCAP)  # [BLOCK_M, BLOCK_N]
        if MASKED:
            keep = _keep(pos_q, offs_k + k_offset, shift, doc_lo, doc_hi, CAUSAL, WINDOW, GROUP, N_SINK, DOCS)
            b_s = tl.where(keep & m_k[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_safe = b_m_new
        if MASKED:
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with no key yet
        b_p = tl.exp2(b_s - b_m_safe[:, None])
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_m_new
    return b_acc, b_m, b_l


@triton.jit
def _query_program(
    H,
    GQA,
    SHIFT_FROM,
    GROUP: tl.constexpr,
    SHIFT_HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """What a program that owns a block of queries (forward, dQ) works on: its block, batch, query
    head, K/V head, the head's group shift, and the row / key / feature offsets."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    shift = 0
    if SHIFT_HEADS:
        shift = tl.where(i_h >= SHIFT_FROM, GROUP // 2, 0)
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return i_m, i_bh, i_b, i_h, i_h // GQA, shift, offs_m, tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)


@triton.jit
def _query_block_keys(
    i_m, offs_m, m_m, shift, q_offset, k_offset, SQ, SK, DOC_START, DOC_END,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, N_SINK: tl.constexpr, DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """For a block of queries: their global positions, the key blocks to visit (`_key_bounds`): the
    sinks [0, sink_hi) and [lo, hi), of which [lo, whole_hi) need no mask (plain spans only), and
    each query's document bounds (`_doc_bounds`)."""
    pos_q = offs_m + q_offset
    q_first = i_m * BLOCK_M + q_offset
    q_last = tl.minimum(i_m * BLOCK_M + BLOCK_M, SQ) - 1 + q_offset
    lo, hi, sink_hi = _key_bounds(
        q_first, q_last, shift, k_offset, SK, DOC_START, DOC_END, CAUSAL, WINDOW, GROUP, N_SINK, DOCS, BLOCK_N
    )
    doc_lo, doc_hi = _doc_bounds(DOC_START, DOC_END, pos_q, m_m, DOCS)
    whole_hi = lo  # key blocks [lo, whole_hi): seen whole by every query of the block, no mask
    if WINDOW == 0 and GROUP == 0 and not DOCS:  # plain causal / full: whole blocks need no mask
        limit = SK
        if CAUSAL:
            limit = tl.minimum(limit, q_first - k_offset + 1)
        whole_hi = _whole_blocks_end(lo, limit, BLOCK_N)
    return pos_q, lo, whole_hi, hi, sink_hi, doc_lo, doc_hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    SQ, SK, H, GQA, q_offset, k_offset, qk_scale, DOC_START, DOC_END, SHIFT_FROM,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, N_SINK: tl.constexpr, SHIFT_HEADS: tl.constexpr,
    DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i_m, i_bh, i_b, i_h, i_hk, shift, offs_m, offs_n, offs_d = _query_program(
        H, GQA, SHIFT_FROM, GROUP, SHIFT_HEADS, BLOCK_M, BLOCK_N, BLOCK_D
    )
    m_m, m_d = offs_m < SQ, offs_d < HEAD_DIM
    p_q = (
        Q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    )
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk * stride_kh
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk * stride_vh
    pos_q, lo, whole_hi, hi, sink_hi, doc_lo, doc_hi = _query_block_keys(
        i_m, offs_m, m_m, shift, q_offset, k_offset, SQ, SK, DOC_START, DOC_END,
        CAUSAL, WINDOW, GROUP, N_SINK, DOCS, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    # The whole blocks first (below the causal diagonal: no mask), then the masked ones: the sinks
    # (a loop of their own: it costs registers only when the span has sinks) and [whole_hi, hi).
    b_acc, b_m, b_l = _fwd_blocks(
        b_acc, b_m, b_l, b_q, p_k0, p_v0, stride_ks, stride_vs, pos_q, doc_lo, doc_hi, offs_n, offs_d, lo, whole_hi,
        shift, k_offset, SK, HEAD_DIM, qk_scale, CAUSAL, WINDOW, GROUP, N_SINK, DOCS, SOFTCAP, False,
    )  # fmt: skip
    if N_SINK > 0:  # the sink blocks, before the span's own range (empty when that range starts at 0)
        b_acc, b_m, b_l = _fwd_blocks(
            b_acc, b_m, b_l, b_q, p_k0, p_v0, stride_ks, stride_vs, pos_q, doc_lo, doc_hi, offs_n, offs_d, 0, sink_hi,
            shift, k_offset, SK, HEAD_DIM, qk_scale, CAUSAL, WINDOW, GROUP, N_SINK, DOCS, SOFTCAP, True,
        )  # fmt: skip
    b_acc, b_m, b_l = _fwd_blocks(
        b_acc, b_m, b_l, b_q, p_k0, p_v0, stride_ks, stride_vs, pos_q, doc_lo, doc_hi, offs_n, offs_d, whole_hi, hi,
        shift, k_offset, SK, HEAD_DIM, qk_scale, CAUSAL, WINDOW, GROUP, N_SINK, DOCS, SOFTCAP, True,
    )  # fmt: skip

    seen = b_l > 0
    b_out = b_acc / tl.where(seen, b_l, 1.0)[:, None]
    b_lse = tl.where(seen, (b_m + tl.log2(tl.where(seen, b_l, 1.0))) / LOG2E, float("-inf"))
    p_o = (
        O + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    )
    tl.store(p_o, b_out.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(LSE + i_bh.to(tl.int64) * SQ + offs_m, b_lse, mask=m_m)


@triton.jit
def _dq_blocks(
    b_dq, b_q, b_do, b_lse2, b_delta, p_k0, p_v0, stride_ks, stride_vs, pos_q, m_m, doc_lo, doc_hi,
    offs_n, offs_d, first, end, shift, k_offset, SK, HEAD_DIM: tl.constexpr, qk_scale,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, N_SINK: tl.constexpr, DOCS: tl.constexpr,
    SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The key blocks [first, end) of dQ; without MASKED whole ones (as in `_fwd_blocks`). Rows past
    the queries need no mask: their q, dO and delta load as zeros, so dS is zero there."""
    for start in range(first, end, offs_n.shape[0]):
        offs_k = start + offs_n
        m_k = offs_k < SK
        b_k = _load_rows(_tile(p_k0, start, offs_n, offs_d, stride_ks), m_k, offs_d, HEAD_DIM, MASKED)
        b_v = _load_rows(_tile(p_v0, start, offs_n, offs_d, stride_vs), m_k, offs_d, HEAD_DIM, MASKED)
        b_s, b_t = _scores(tl.dot(b_q, tl.trans(b_k)), qk_scale, SOFTCAP)
        b_p = tl.exp2(b_s - b_lse2[:, None])
        if MASKED:
            keep = _keep(pos_q, offs_k + k_offset, shift, doc_lo, doc_hi, CAUSAL, WINDOW, GROUP, N_SINK, DOCS)
            b_p = tl.where(keep & m_k[None, :] & m_m[:, None], b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        if SOFTCAP > 0:  # through the cap: d(c·tanh(x/c))/dx = 1 - tanh²
            b_ds = b_ds * (1 - b_t * b_t)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    return b_dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    SQ, SK, H, GQA, q_offset, k_offset, qk_scale, sm_scale, DOC_START, DOC_END, SHIFT_FROM,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, N_SINK: tl.constexpr, SHIFT_HEADS: tl.constexpr,
    DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dQ = scale · Σ_j dS_ij K_j with dS = P ∘ (dO Vᵀ − D); Q, dO, dQ share strides (contiguous)."""
    i_m, i_bh, i_b, i_h, i_hk, shift, offs_m, offs_n, offs_d = _query_program(
        H, GQA, SHIFT_FROM, GROUP, SHIFT_HEADS, BLOCK_M, BLOCK_N, BLOCK_D
    )
    m_m, m_d = offs_m < SQ, offs_d < HEAD_DIM
    q_rows = i_b.to(tl.int64) * stride_qb + i_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    b_q = tl.load(Q + q_rows, mask=m_m[:, None] & m_d[None, :], other=0.0)
    b_do = tl.load(DO + q_rows, mask=m_m[:, None] & m_d[None, :], other=0.0)
    b_lse2 = tl.load(LSE + i_bh.to(tl.int64) * SQ + offs_m, mask=m_m, other=0.0) * LOG2E
    b_lse2 = tl.where(b_lse2 == float("-inf"), 0.0, b_lse2)  # rows with no key: P = 0
    b_delta = tl.load(DELTA + i_bh.to(tl.int64) * SQ + offs_m, mask=m_m, other=0.0)
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk * stride_kh
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk * stride_vh
    pos_q, lo, whole_hi, hi, sink_hi, doc_lo, doc_hi = _query_block_keys(
        i_m, offs_m, m_m, shift, q_offset, k_offset, SQ, SK, DOC_START, DOC_END,
        CAUSAL, WINDOW, GROUP, N_SINK, DOCS, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # As in the forward: whole key blocks without a mask, then the sinks and [whole_hi, hi) with one.
    b_dq = _dq_blocks(
        b_dq, b_q, b_do, b_lse2, b_delta, p_k0, p_v0, stride_ks, stride_vs, pos_q, m_m, doc_lo, doc_hi,
        offs_n, offs_d, lo, whole_hi, shift, k_offset, SK, HEAD_DIM, qk_scale,
        CAUSAL, WINDOW, GROUP, N_SINK, DOCS, SOFTCAP, False,
    )  # fmt: skip
    if N_SINK > 0:
        b_dq = _dq_blocks(
            b_dq, b_q, b_do, b_lse2, b_delta, p_k0, p_v0, stride_ks, stride_vs, pos_q, m_m, doc_lo, doc_hi,
            offs_n, offs_d, 0, sink_hi, shift, k_offset, SK, HEAD_DIM, qk_scale,
            CAUSAL, WINDOW, GROUP, N_SINK, DOCS, SOFTCAP, True,
        )  # fmt: skip
    b_dq = _dq_blocks(
        b_dq, b_q, b_do, b_lse2, b_delta, p_k0, p_v0, stride_ks, stride_vs, pos_q, m_m, doc_lo, doc_hi,
        offs_n, offs_d, whole_hi, hi, shift, k_offset, SK, HEAD_DIM, qk_scale,
        CAUSAL, WINDOW, GROUP, N_SINK, DOCS, SOFTCAP, True,
    )  # fmt: skip
    tl.store(DQ + q_rows, (b_dq * sm_scale).to(DQ.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _query_bounds(
    k_first,
    k_last,
    shift,
    q_offset,
    SQ,
    DOC_START,
    DOC_END,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    N_SINK: tl.constexpr,
    DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Local query range [lo, hi) that may see keys k_first..k_last (global); lo aligned down."""
    lo = 0
    hi = SQ
    if CAUSAL:
        lo = tl.maximum(lo, k_first - q_offset)
    if WINDOW > 0:
        hi = tl.minimum(hi, k_last + WINDOW - q_offset)
    if GROUP > 0:  # noqa: SIM102 - a compile-time test around a run-time one
        if k_first >= N_SINK:  # sinks are seen by every later query
            lo = tl.maximum(lo, (k_first + shift) // GROUP * GROUP - shift - q_offset)
            hi = tl.minimum(hi, ((k_last + shift) // GROUP + 1) * GROUP - shift - q_offset)
    if DOCS:  # symmetric: only queries of the keys' documents see them
        lo = tl.maximum(lo, tl.load(DOC_START + k_first) - q_offset)
        hi = tl.minimum(hi, tl.load(DOC_END + k_last) - q_offset)
    return lo // BLOCK_M * BLOCK_M, hi


@triton.jit
def _attn_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dkb, stride_dks, stride_dkh,
    SQ, SK, H, GQA, q_offset, k_offset, qk_scale, sm_scale, DOC_START, DOC_END, SHIFT_FROM,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, N_SINK: tl.constexpr, SHIFT_HEADS: tl.constexpr,
    DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dV = Σ_i Pᵀ dO and dK = scale · Σ_i dSᵀ Q over the GQA group of query heads of this K/V head.
    DK and DV share strides (fp32 buffers); Q and DO share strides. One masked loop over the query
    blocks, also on the plain spans: splitting off the whole blocks as in the forward cost 25-40
    registers here (fp32 at D = 64 spilled on sm_80) for a mask of BLOCK_N × BLOCK_M compares."""
    i_n, i_bhk = tl.program_id(0), tl.program_id(1)
    H_KV = H // GQA
    i_b, i_hk = i_bhk // H_KV, i_bhk % H_KV
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_n, m_d = offs_n < SK, offs_d < HEAD_DIM
    m_nd = m_n[:, None] & m_d[None, :]
    b_k = tl.load(
        K
        + i_b.to(tl.int64) * stride_kb
        + i_hk * stride_kh
        + offs_n[:, None].to(tl.int64) * stride_ks
        + offs_d[None, :],
        mask=m_nd,
        other=0.0,
    )
    b_v = tl.load(
        V
        + i_b.to(tl.int64) * stride_vb
        + i_hk * stride_vh
        + offs_n[:, None].to(tl.int64) * stride_vs
        + offs_d[None, :],
        mask=m_nd,
        other=0.0,
    )
    pos_k = offs_n + k_offset
    k_first = i_n * BLOCK_N + k_offset
    k_last = tl.minimum(i_n * BLOCK_N + BLOCK_N, SK) - 1 + k_offset
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i_g in range(0, GQA):
        i_h = i_hk * GQA + i_g
        shift = 0
        if SHIFT_HEADS:
            shift = tl.where(i_h >= SHIFT_FROM, GROUP // 2, 0)
        lo, hi = _query_bounds(
            k_first, k_last, shift, q_offset, SQ, DOC_START, DOC_END, CAUSAL, WINDOW, GROUP, N_SINK, DOCS, BLOCK_M
        )
        p_q0 = Q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh
        p_do0 = DO + i_b.to(tl.int64) * stride_qb + i_h * stride_qh
        i_bh = i_b * H + i_h
        for start in range(lo, hi, BLOCK_M):
            offs_q = start + offs_m
            m_q = offs_q < SQ
            m_qd = m_q[:, None] & m_d[None, :]
            b_q = tl.load(p_q0 + offs_q[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=m_qd, other=0.0)
            b_do = tl.load(p_do0 + offs_q[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=m_qd, other=0.0)
            b_lse2 = tl.load(LSE + i_bh.to(tl.int64) * SQ + offs_q, mask=m_q, other=0.0) * LOG2E
            b_lse2 = tl.where(b_lse2 == float("-inf"), 0.0, b_lse2)
            b_delta = tl.load(DELTA + i_bh.to(tl.int64) * SQ + offs_q, mask=m_q, other=0.0)
            doc_lo, doc_hi = _doc_bounds(DOC_START, DOC_END, offs_q + q_offset, m_q, DOCS)
            # transposed scores [BLOCK_N, BLOCK_M]: keys along rows
            keep = (
                tl.trans(_keep(offs_q + q_offset, pos_k, shift, doc_lo, doc_hi, CAUSAL, WINDOW, GROUP, N_SINK, DOCS))
                & m_q[None, :]
                & m_n[:, None]
            )
            b_st, b_tt = _scores(tl.dot(b_k, tl.trans(b_q)), qk_scale, SOFTCAP)
            b_pt = tl.where(keep, tl.exp2(b_st - b_lse2[None, :]), 0.0)
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do)
            b_dpt = tl.dot(b_v, tl.trans(b_do))
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            if SOFTCAP > 0:
                b_dst = b_dst * (1 - b_tt * b_tt)
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q)
    rows = (
        i_b.to(tl.int64) * stride_dkb + i_hk * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dks + offs_d[None, :]
    )
    tl.store(DK + rows, (b_dk * sm_scale).to(DK.dtype.element_ty), mask=m_nd)
    tl.store(DV + rows, b_dv.to(DV.dtype.element_ty), mask=m_nd)


def _span_args(span: Span, docs, n_heads: int) -> dict:
    return {
        "SHIFT_FROM": span.first_shifted(n_heads),
        "DOC_START": None if docs is None else docs.start,
        "DOC_END": None if docs is None else docs.end,
        "DOCS": docs is not None,
        "WINDOW": span.window,
        "GROUP": span.group,
        "N_SINK": span.n_sink,
        "CAUSAL": span.causal,
        "SHIFT_HEADS": span.shifts_heads,
    }


# CUDA launch configuration per kernel, BLOCK_D, element size (2: bf16 / fp16, 4: fp32, up to D = 128)
# and architecture (80: A100, 163 KiB of shared memory per block; 90: H100, 227 KiB; other GPUs take
# the row of the last of the two they follow, unverified: sm_86 / sm_89 / sm_120 allow only ~99 KiB,
# less than D = 128's dQ needs): (BLOCK_M, BLOCK_N, num_warps, num_stages). Every entry is one the compile report
# (`python -m lsts.kernels.compile_report`) shows spilling no register at D <= 128 and fitting the
# block's shared memory, and `tests/test_compile_report.py` checks that it compiles exactly these. Why
# these: 8 warps halve each thread's share of the fp32 accumulators (at 4 warps dK/dV spilled); the
# forward's 128 × 64 tiles are the FlashAttention-2 tutorial's; dK/dV streams 32 queries past 64 keys;
# the widest tiles (D = 256, or 128 in fp32) fit shared memory with two stages and narrower blocks, and
# keep 64 keys in dK/dV on sm_90 (wgmma needs 64 rows), at the price of a small spill at D = 256; fp32
# dK/dV at D = 128 on sm_90 takes 32 keys (mma.sync, not wgmma) to spill nothing.
_CUDA_TILES = {
    ("fwd", 64, 2, 80): (128, 64, 8, 3),
    ("fwd", 128, 2, 80): (128, 64, 8, 3),
    ("fwd", 256, 2, 80): (64, 64, 8, 2),
    ("fwd", 64, 4, 80): (128, 64, 8, 3),
    ("fwd", 128, 4, 80): (64, 64, 8, 2),
    ("fwd", 64, 2, 90): (128, 64, 8, 3),
    ("fwd", 128, 2, 90): (128, 64, 8, 3),
    ("fwd", 256, 2, 90): (64, 64, 8, 2),
    ("fwd", 64, 4, 90): (128, 64, 8, 3),
    ("fwd", 128, 4, 90): (64, 64, 8, 2),
    ("dq", 64, 2, 80): (64, 64, 8, 3),
    ("dq", 128, 2, 80): (64, 64, 8, 3),
    ("dq", 256, 2, 80): (64, 32, 8, 2),
    ("dq", 64, 4, 80): (64, 32, 8, 2),
    ("dq", 128, 4, 80): (64, 32, 8, 2),
    ("dq", 64, 2, 90): (64, 64, 8, 3),
    ("dq", 128, 2, 90): (64, 64, 8, 3),
    ("dq", 256, 2, 90): (64, 32, 8, 2),
    ("dq", 64, 4, 90): (64, 64, 8, 3),
    ("dq", 128, 4, 90): (64, 32, 8, 2),
    ("dkv", 64, 2, 80): (32, 64, 8, 3),
    ("dkv", 128, 2, 80): (32, 64, 8, 3),
    ("dkv", 256, 2, 80): (64, 32, 8, 2),
    ("dkv", 64, 4, 80): (32, 64, 8, 3),
    ("dkv", 128, 4, 80): (64, 32, 8, 2),
    ("dkv", 64, 2, 90): (32, 64, 8, 3),
    ("dkv", 128, 2, 90): (32, 64, 8, 3),
    ("dkv", 256, 2, 90): (16, 64, 8, 2),
    ("dkv", 64, 4, 90): (32, 64, 8, 3),
    ("dkv", 128, 4, 90): (32, 32, 8, 2),
}


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes (and on CUDA warps and pipeline stages) of one attention kernel ("fwd", "dq", "dkv").

    In the interpreter the tiles stay small (16): the tests exercise block skipping at small shapes."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": block_d}
    width = (kernel, max(64, block_d), dtype.itemsize)
    if width not in {key[:3] for key in _CUDA_TILES}:
        raise ValueError(
            f"head dim {head_dim} in {dtype} does not fit the Triton attention kernels on CUDA: at most 256 in "
            "bf16 / fp16, 128 in fp32 (cast q, k, v to bf16)"
        )
    capability = triton.runtime.driver.active.get_current_target().arch
    block_m, block_n, warps, stages = _CUDA_TILES[(*width, 90 if capability >= 90 else 80)]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": warps, "num_stages": stages}


def attention_fwd(
    q, k, v, softmax_scale: float, span: Span, q_offset: int = 0, k_offset: int = 0, docs=None, softcap: float = 0.0,
    unrounded: bool = False,
):  # fmt: skip
    """``q [B, Sq, H, D]``, ``k, v [B, Sk, H_kv, D]`` (last dim contiguous) -> ``(out, lse)``; ``out``
    in float32 when ``unrounded`` (the kernel stores its float32 accumulator as it is)."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    # NaN-poisoned under the tests: an unwritten row cannot pass unnoticed.
    out = kernel_buffer(q.shape, _result_dtype(q.dtype, unrounded), q.device)
    lse = kernel_buffer((b, h, sq), torch.float32, q.device)
    blocks = launch_config("fwd", d, q.dtype, q.device)
    grid = (triton.cdiv(sq, blocks["BLOCK_M"]), b * h)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        sq, sk, h, h // h_kv, q_offset, k_offset, softmax_scale * LOG2E.value, HEAD_DIM=d, **_span_args(span, docs, h),
        SOFTCAP=float(softcap), **blocks,
    )  # fmt: skip
    return out, lse


def _result_dtype(dtype: torch.dtype, unrounded: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if unrounded else dtype


def attention_bwd(
    dout, q, k, v, out, lse, softmax_scale: float, span: Span, q_offset=0, k_offset=0, docs=None, softcap: float = 0.0,
    unrounded: bool = False,
):  # fmt: skip
    """Gradients ``(dq, dk, dv)`` given the queries' global ``out`` and ``lse``; float32 when
    ``unrounded`` (dK/dV are accumulated in float32 buffers either way)."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    dout = dout.contiguous()
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Sq]
    lse = lse.float().contiguous()
    dq = kernel_buffer(q.shape, _result_dtype(q.dtype, unrounded), q.device)
    dk = kernel_buffer(k.shape, torch.float32, k.device)
    dv = kernel_buffer(v.shape, torch.float32, v.device)
    spans = {**_span_args(span, docs, h), "SOFTCAP": float(softcap)}
    common = (sq, sk, h, h // h_kv, q_offset, k_offset, softmax_scale * LOG2E.value, softmax_scale)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    dq_blocks, dkv_blocks = (launch_config(name, d, q.dtype, q.device) for name in ("dq", "dkv"))
    _attn_bwd_dq_kernel[(triton.cdiv(sq, dq_blocks["BLOCK_M"]), b * h)](
        q, k, v, dout, lse, delta, dq, *strides, *common, HEAD_DIM=d, **spans, **dq_blocks
    )
    _attn_bwd_dkv_kernel[(triton.cdiv(sk, dkv_blocks["BLOCK_N"]), b * h_kv)](
        q, k, v, dout, lse, delta, dk, dv, *strides, *dk.stride()[:3], *common, HEAD_DIM=d, **spans, **dkv_blocks
    )
    return dq, dk.to(_result_dtype(k.dtype, unrounded)), dv.to(_result_dtype(v.dtype, unrounded))


__all__ = ["attention_bwd", "attention_fwd"]
