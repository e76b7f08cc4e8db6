"""Fused CPU attention: PyTorch's flash-attention CPU kernel, which returns the log-sum-exp.

``aten._scaled_dot_product_flash_attention_for_cpu`` is a private op (linear memory, ~150 GFLOP/s on
two cores in fp32). This module is the only place that calls it, so a change of its signature breaks
here and in ``tests/test_local_attention.py``, nowhere else. The op takes [B, H, S, D]; we pass
transposed views of our [B, S, H, D] tensors (no copy) and it handles GQA natively. Its backward
accepts an external ``out`` and ``lse``, which makes it an exact key-partition backward for ring steps.

Spans other than full and aligned causal run blockwise (`span_attention_fwd`): every chunk of queries
attends only to the keys its span can reach, with an additive mask (the op rejects boolean masks),
so window and group spans stay linear in N. Packed documents (`documents.Documents`) take the
same path: each chunk reads only the keys of its queries' documents. So does logit softcapping,
which the fused op cannot do: each chunk's capped scores are materialized (`reference`), chunk by
chunk, so memory stays linear in N for every span.
"""

from __future__ import annotations

import torch

from lsts.kernels.attention import reference
from lsts.kernels.attention.spans import Span

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Sq, H, D]``, ``k, v [B, Sk, H_kv, D]`` -> ``out [B, Sq, H, D]``, ``lse [B, H, Sq]``."""
    out, lse = _fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=softmax_scale)
    return out.transpose(1, 2), lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``q`` and for the keys ``k, v`` given the queries' global ``out`` and ``lse``."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - BSHD <-> BHSD view
    dq, dk, dv = _bwd(t(dout), t(q), t(k), t(v), t(out), lse, 0.0, causal, scale=softmax_scale)
    return t(dq), t(dk), t(dv)


# --- spans: blockwise over query chunks, each against only the keys its span can reach ---------


def _key_slices(span: Span, q_first: int, q_last: int, shift: int, k_offset: int, sk: int, docs) -> list[slice]:
    """Local key slices (sinks first) that global queries ``q_first..q_last`` may see."""
    lo, hi = span.key_range(q_first, q_last, shift)
    if docs is not None:
        d_lo, d_hi = docs.bounds(q_first, q_last)
        lo, hi = max(lo, d_lo), d_hi if hi is None else min(hi, d_hi)
    lo, hi = max(lo - k_offset, 0), min(sk if hi is None else hi - k_offset, sk)
    sink_hi = min(span.n_sink - k_offset, sk, lo)
    slices = [slice(0, sink_hi)] if sink_hi > 0 else []
    return [*slices, slice(lo, hi)] if hi > lo else slices


def _head_groups(span: Span, n_heads: int, n_kv: int) -> list[tuple[slice, slice | torch.Tensor, int]]:
    """``(query heads, kv heads, shift)``: spans that shift some of the heads run the unshifted and
    the shifted ones on their own (either may be empty). Where a K/V head's query group straddles
    the boundary, each side gets one K/V head per query head (an index tensor) instead of a slice."""
    half, group = span.first_shifted(n_heads), n_heads // n_kv
    if half == n_heads:  # no shifted head in this call
        return [(slice(0, n_heads), slice(0, n_kv), 0)]
    # With one query head the unshifted half is empty (the fused op divides by zero on 0 heads).
    halves = [
        (heads, shift)
        for heads, shift in [(slice(0, half), 0), (slice(half, n_heads), span.size // 2)]
        if heads.stop > heads.start
    ]
    if half % group == 0:
        return [(heads, slice(heads.start // group, heads.stop // group), shift) for heads, shift in halves]
    return [(heads, torch.arange(heads.start, heads.stop) // group, shift) for heads, shift in halves]


def _chunks(span: Span, sq: int, sk: int, n_heads: int, n_kv: int, q_offset: int, k_offset: int, chunk: int, docs):
    """Yield ``(heads, kv heads, query slice, key slices, keep mask)`` work items."""
    for heads, kv_heads, shift in _head_groups(span, n_heads, n_kv):
        for c0 in range(0, sq, chunk):
            qs = slice(c0, min(c0 + chunk, sq))
            keys = _key_slices(span, c0 + q_offset, qs.stop - 1 + q_offset, shift, k_offset, sk, docs)
            if not keys:
                continue
            q_pos = torch.arange(qs.start, qs.stop) + q_offset
            k_pos = torch.cat([torch.arange(s.start, s.stop) for s in keys]) + k_offset
            keep = span.mask(q_pos, k_pos, n_heads)[heads.start if span.shifts_heads else 0]
            if docs is not None:
                keep = keep & docs.mask(q_pos, k_pos)
            yield heads, kv_heads, qs, keys, keep


def _gather_keys(x: torch.Tensor, keys: list[slice], kv_heads) -> torch.Tensor:
    parts = [x[:, s][:, :, kv_heads] for s in keys]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _scatter_keys(grad: torch.Tensor, part: torch.Tensor, keys: list[slice], kv_heads) -> None:
    """Add a chunk's K or V gradient back at its key rows and heads (index_add_ folds the
    repeated K/V heads of a straddling half)."""
    start = 0
    for s in keys:
        n = s.stop - s.start
        rows = part[:, start : start + n]
        if isinstance(kv_heads, slice):
            grad[:, s, kv_heads] += rows
        else:
            grad[:, s].index_add_(2, kv_heads, rows.to(grad.dtype))
        start += n


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))


def _chunk_fwd(qc, kc, vc, keep, softmax_scale: float, softcap: float):
    """``(out [B, c, h, D], lse [B, h, c])`` of one work item. The fused op has no softcap: capped
    scores take the materialized path on the chunk (its scores only, so memory stays linear in N)."""
    if softcap:
        return reference.attention_fwd(qc, kc, vc, softmax_scale, mask=keep, softcap=softcap)
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - BSHD <-> BHSD view
    o, lse = _fwd(t(qc), t(kc), t(vc), 0.0, False, attn_mask=_additive(keep, qc.dtype), scale=softmax_scale)
    return t(o), lse


def _chunk_bwd(dout, q, k, v, out, lse, keep, softmax_scale: float, softcap: float):
    """``(dq, dk, dv)`` of one work item (dk, dv per gathered K/V head), in the inputs' dtype."""
    if softcap:
        return reference.attention_bwd(dout, q, k, v, out, lse, softmax_scale, mask=keep, softcap=softcap)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    g = _bwd(t(dout), t(q), t(k), t(v), t(out), lse.contiguous(), 0.0, False, attn_mask=_additive(keep, q.dtype),
             scale=softmax_scale)  # fmt: skip
    return t(g[0]), t(g[1]), t(g[2])


def span_attention_fwd(
    q, k, v, softmax_scale: float, span: Span, q_offset: int, k_offset: int, docs=None, softcap=0.0, chunk=256
):
    """``(out, lse)`` of span attention, linear in N for window and group spans: each chunk of
    ``chunk`` queries runs the fused kernel on the keys its span reaches, with an additive mask
    (or, with ``softcap``, the capped scores of that chunk materialized). Rows that see no key get
    ``out = 0`` and ``lse = -inf``."""
    b, sq, h, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32))
    for heads, kv_heads, qs, keys, keep in _chunks(
        span, sq, k.shape[1], h, k.shape[2], q_offset, k_offset, chunk, docs
    ):
        kc, vc = _gather_keys(k, keys, kv_heads), _gather_keys(v, keys, kv_heads)
        o, l = _chunk_fwd(q[:, qs, heads], kc, vc, keep, softmax_scale, softcap)
        seen = keep.any(-1)
        out[:, qs, heads] = o
        lse[:, heads, qs] = l.masked_fill(~seen, float("-inf"))
    return out, lse


def span_attention_bwd(
    dout, q, k, v, out, lse, softmax_scale: float, span: Span, q_offset: int, k_offset: int, docs=None, softcap=0.0,
    chunk=256,
):  # fmt: skip
    """Gradients of `span_attention_fwd` (``out`` and ``lse`` are global for the queries). A key's
    dK/dV sums the contributions of every query chunk that reaches it: they are computed and summed
    in float32 (float64 for float64) and rounded once, so bf16/fp16 inputs are upcast first (exact)."""
    h, dtypes = q.shape[2], (q.dtype, k.dtype, v.dtype)
    acc = torch.promote_types(q.dtype, torch.float32)
    dout, q, k, v, out = (x.to(acc) for x in (dout, q, k, v, out))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    lse = lse.masked_fill(torch.isinf(lse), 0.0)  # rows with no key: P = exp(-inf - 0) = 0, no NaN
    for heads, kv_heads, qs, keys, keep in _chunks(
        span, q.shape[1], k.shape[1], h, k.shape[2], q_offset, k_offset, chunk, docs
    ):
        kc, vc = _gather_keys(k, keys, kv_heads), _gather_keys(v, keys, kv_heads)
        rows = (x[:, qs, heads] for x in (dout, q))
        g = _chunk_bwd(*rows, kc, vc, out[:, qs, heads], lse[:, heads, qs], keep, softmax_scale, softcap)
        dq[:, qs, heads] = g[0]
        _scatter_keys(dk, g[1], keys, kv_heads)
        _scatter_keys(dv, g[2], keys, kv_heads)
    return tuple(grad.to(dtype) for grad, dtype in zip((dq, dk, dv), dtypes))
