"""SPT sparse MHA (``docs/algorithms.md`` §8): each query attends its top-L causal keys by product-
quantizer code collisions, through SDDMM -> sparse softmax -> SpMM.

**Selection** (`select_keys`). Codes ``q_codes [B, N, H, S]``, ``k_codes [B, N, H_kv, S]`` (``S =
D / 8`` sub-spaces, see `pq.ProductQuantizer`). The score of key ``j <= i`` for query ``i`` is the
number of sub-spaces where their codes are equal; each query keeps the ``L`` keys of highest score,
**ties going to the later (nearer) key**, so the choice is deterministic and equals a brute-force sort
of the ``[N, N]`` score matrix (`select_keys_reference`): the selection is exact, not bucketed.
Result ``idx [B, H, N, L]`` (int32): each row's keys, then ``-1`` in empty slots — a query with fewer
than ``L`` causal keys keeps only its real keys (SPT's own code fills those slots with key 0; here
they are masked). The order of the real slots is the backend's (the CPU twin lists them by rank, the
Triton kernel by descending position) and does not matter to the attention. The CPU twin ranks
all pairs of a chunk of queries with one matmul (``n·collisions + j``) and a ``topk``: ``O(N²·S)``
work, ``O(chunk·N)`` memory.

**Attention** (`sparse_attention`). ``s_il = clamp(τ q_i·k_idx[i,l], -c, c)`` (``c = 10``) over the
slots, a softmax over each row's real slots, then ``out_i = Σ_l p_il v_idx[i,l]``. The clamp bounds
every logit, so the softmax needs no running maximum: ``exp(s - c)`` is in ``[e^-2c, 1]``. Saved for
backward: ``idx``, ``out`` and ``lse [B, H, N]`` — ``O(N·L)``, never ``O(N²)``; probabilities are
recomputed in backward (FlashAttention-style, ``D = rowsum(dO·O)``, ``dS = P ∘ (dP - D)`` zeroed where
the clamp was active).

Backends (`lsts.kernels.backend`): ``triton`` (`spt.triton`: selection, fwd, bwd with atomic dK/dV),
``torch`` (the CPU twin, chunks of queries, two paths: where the budget is a sizeable share of
a chunk's key range — SPT's N/8 — the chunk's logits come from one ``[chunk, N]`` matmul sampled at
``idx`` and P·V is a matmul of P spread back over that block, because BLAS pairs are far cheaper on
CPU than gathered rows; for small budgets the keys are gathered with ``index_select`` (``[chunk, L,
D]``) and dK / dV scattered with ``index_add_``; either way nothing ``N×N`` exists and the transient
is bounded), ``reference`` (a dense
``[N, N]`` mask built from ``idx``; float64; the tests' oracle). Layout ``[B, N, H, D]``, GQA by
``H % H_kv == 0``.

Limits: self-attention of one whole sequence (no offsets, no documents, no sequence parallelism: a
query's top-L may sit anywhere in its prefix, so a sharded sequence would need every rank's codes and
arbitrary remote keys); ``c`` must be at most 40 so that ``e^-2c`` stays a normal float32.
"""

from __future__ import annotations

import math

import torch

from lsts.kernels.attention import check_qkv, default_scale
from lsts.kernels.backend import resolve_backend

_SUPPORTED = ("triton", "torch", "reference")
_GATHER_ELEMS = 1 << 23  # elements of one gathered [chunk, L, D] block of the CPU twin (32 MiB fp32)
_SAMPLED_ELEMS = 1 << 22  # elements of one dense-sampled [chunk, N] score block of the CPU twin
_SAMPLED_DENSITY = 16  # dense-sampled when a chunk's key range is at most this many times the budget
_SELECT_ELEMS = 1 << 24  # elements of one [H, chunk, N] score block of the CPU selection


def budget_for(seq_len: int, ratio: float = 1 / 8) -> int:
    """SPT's key budget ``L = ceil(N · ratio)`` (N/8 by default), at least 1."""
    if not ratio > 0:
        raise ValueError(f"the key budget ratio must be > 0, got {ratio}")
    return max(1, math.ceil(seq_len * ratio))


# ------------------------------------------------------------------------------------ selection


def _check_codes(q_codes: torch.Tensor, k_codes: torch.Tensor, budget: int) -> None:
    if q_codes.dim() != 4 or k_codes.dim() != 4:
        shapes = f"{tuple(q_codes.shape)}, {tuple(k_codes.shape)}"
        raise ValueError(f"codes must be [batch, seq, heads, n_sub]; got {shapes}")
    b, n, h, s = q_codes.shape
    if k_codes.shape[0] != b or k_codes.shape[1] != n or k_codes.shape[3] != s or h % k_codes.shape[2]:
        raise ValueError(f"key codes {tuple(k_codes.shape)} do not fit query codes {tuple(q_codes.shape)} (GQA)")
    if budget < 1:
        raise ValueError(f"the key budget L must be >= 1, got {budget}")


def _one_hot(codes: torch.Tensor, n_codes: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, N, H, S]`` codes -> ``[B, H, N, S·n_codes]`` one-hot (a code collision count is then a
    dot product)."""
    flat = codes.long() + torch.arange(codes.shape[-1], device=codes.device) * n_codes
    out = torch.zeros(*codes.shape[:-1], codes.shape[-1] * n_codes, dtype=dtype, device=codes.device)
    out.scatter_(-1, flat, 1.0)
    return out.transpose(1, 2)


def _select_torch(q_codes: torch.Tensor, k_codes: torch.Tensor, budget: int, n_codes: int) -> torch.Tensor:
    b, n, h, n_sub = q_codes.shape
    gqa = h // k_codes.shape[2]
    # One matmul gives each pair's rank  n·collisions + j  (ties to the later key): the query side is
    # its one-hot times n plus a column of ones, the key side its one-hot plus a column holding j.
    exact32 = n * (n_sub + 1) < 2**24
    dtype = torch.float32 if exact32 else torch.float64
    pos = torch.arange(n, device=q_codes.device)
    qh = torch.cat([_one_hot(q_codes, n_codes, dtype) * n, torch.ones(b, h, n, 1, dtype=dtype)], dim=-1)
    kh = torch.cat([_one_hot(k_codes, n_codes, dtype), pos.to(dtype).expand(b, k_codes.shape[2], n)[..., None]], -1)
    kh = kh.repeat_interleave(gqa, dim=1)
    idx = torch.full((b, h, n, budget), -1, dtype=torch.int32, device=q_codes.device)
    chunk = max(1, _SELECT_ELEMS // max(h * n, 1))
    for bi in range(b):
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            rank = torch.matmul(qh[bi, :, c0:c1], kh[bi, :, :c1].transpose(-1, -2))  # [H, C, c1]
            rank.masked_fill_(pos[:c1] > pos[c0:c1, None], -1.0)  # causal
            top, j = rank.topk(min(budget, c1), dim=-1)
            idx[bi, :, c0:c1, : j.shape[-1]] = torch.where(top >= 0, j, -1).to(torch.int32)
    return idx


def select_keys_reference(q_codes: torch.Tensor, k_codes: torch.Tensor, budget: int) -> torch.Tensor:
    """The exact top-L by brute force over the full ``[N, N]`` collision matrix (test oracle)."""
    _check_codes(q_codes, k_codes, budget)
    b, n, h, _ = q_codes.shape
    kc = k_codes.repeat_interleave(h // k_codes.shape[2], dim=2)
    score = (q_codes.transpose(1, 2)[:, :, :, None, :] == kc.transpose(1, 2)[:, :, None, :, :]).sum(-1)
    pos = torch.arange(n)
    rank = score.double() * n + pos
    rank = rank.masked_fill(pos[None, :] > pos[:, None], -1.0)
    top, j = rank.topk(min(budget, n), dim=-1)
    j = torch.where(top >= 0, j, -1).sort(dim=-1, descending=True).values
    idx = torch.full((b, h, n, budget), -1, dtype=torch.int32)
    idx[..., : j.shape[-1]] = j.to(torch.int32)
    return idx


def select_keys(
    q_codes: torch.Tensor, k_codes: torch.Tensor, budget: int, n_codes: int = 16, backend: str = "auto"
) -> torch.Tensor:
    """The ``budget`` keys of most code collisions per query, causal: ``idx [B, H, N, L]`` int32,
    descending positions, ``-1`` in empty slots (see the module docstring for the tie rule)."""
    _check_codes(q_codes, k_codes, budget)
    backend = resolve_backend(backend, q_codes.device, "spt key selection", _SUPPORTED)
    if backend == "triton":
        from lsts.kernels.spt import triton as spt_triton

        return spt_triton.select_keys(q_codes, k_codes, budget)
    if backend == "reference":
        return select_keys_reference(q_codes.cpu(), k_codes.cpu(), budget).to(q_codes.device)
    return _select_torch(q_codes, k_codes, budget, n_codes)


# ------------------------------------------------------------------------------------ attention


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _gather(x_bh: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Rows ``safe [C, L]`` of ``x_bh [N, D]`` -> ``[C, L, D]``."""
    return x_bh.index_select(0, safe.flatten()).view(*safe.shape, x_bh.shape[-1])


def _clamped(raw: torch.Tensor, keep: torch.Tensor, scale: float, clamp: float):
    """Clamped logits ``[C, L]`` (``-inf`` at empty slots) and where the clamp let gradients pass."""
    raw = raw * scale
    return raw.clamp(-clamp, clamp).masked_fill(~keep, float("-inf")), raw.abs() <= clamp


def _softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse [C], p [C, L])`` of logits with ``-inf`` at empty slots (a row without keys: p = 0)."""
    lse = torch.logsumexp(s, dim=-1)
    return lse, torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[:, None])


def _sampled(chunk_rows: int, n_keys: int, budget: int) -> bool:
    """Dense-sampled (BLAS on the chunk's ``[C, n_keys]`` scores) when the selection is dense enough
    that matmuls beat row gathers: on CPU a gathered key row costs about as much as 8-16 dense pairs."""
    return n_keys <= _SAMPLED_DENSITY * budget


def _rows_chunk(n: int, budget: int, head_dim: int) -> int:
    """Queries per chunk: the gathered [C, L, D] or the dense-sampled [C, N] block stays bounded."""
    return max(1, min(_GATHER_ELEMS // (budget * head_dim), _SAMPLED_ELEMS // max(n, 1)))


def _spread(vals: torch.Tensor, safe: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Slot values ``[C, L]`` placed in a dense ``[C, n_keys]`` block (empty slots carry 0: they add
    nothing to column 0, and real slots of a row are distinct keys)."""
    return torch.zeros(vals.shape[0], n_keys, dtype=vals.dtype, device=vals.device).scatter_add_(1, safe, vals)


def _chunk_fwd(q_c, k_bh, v_bh, rows, scale: float, clamp: float):
    """One chunk of queries: ``(out [C, D], lse [C])`` over its keys ``rows [C, L]``."""
    keep, c1 = rows >= 0, int(rows.max()) + 1 if rows.numel() else 0
    safe = rows.clamp(min=0).long()
    if _sampled(q_c.shape[0], c1, rows.shape[1]):  # SDDMM as a dense block sampled at idx, SpMM as a matmul
        s, _ = _clamped((q_c @ k_bh[:c1].T).gather(1, safe), keep, scale, clamp)
        lse, p = _softmax(s)
        dense_p = _spread(p, safe, c1)
        return dense_p @ v_bh[:c1], lse
    s, _ = _clamped(torch.bmm(_gather(k_bh, safe), q_c.unsqueeze(-1)).squeeze(-1), keep, scale, clamp)
    lse, p = _softmax(s)
    return torch.bmm(p.unsqueeze(1), _gather(v_bh, safe)).squeeze(1), lse


def _chunk_bwd(q_c, do_c, delta_c, lse_c, k_bh, v_bh, dk_bh, dv_bh, rows, scale: float, clamp: float):
    """dQ of one chunk of queries; adds its share into ``dk_bh`` and ``dv_bh``."""
    keep, c1 = rows >= 0, int(rows.max()) + 1 if rows.numel() else 0
    safe = rows.clamp(min=0).long()
    if _sampled(q_c.shape[0], c1, rows.shape[1]):
        k_c, v_c = k_bh[:c1], v_bh[:c1]
        s, inside = _clamped((q_c @ k_c.T).gather(1, safe), keep, scale, clamp)
        p = torch.exp(s - lse_c[:, None])  # 0 at empty slots
        ds = (p * ((do_c @ v_c.T).gather(1, safe) - delta_c[:, None])).masked_fill_(~inside, 0.0) * scale
        dense_p, dense_ds = _spread(p, safe, c1), _spread(ds, safe, c1)
        dk_bh[:c1] += dense_ds.T @ q_c
        dv_bh[:c1] += dense_p.T @ do_c
        return dense_ds @ k_c
    k_g, v_g, flat = _gather(k_bh, safe), _gather(v_bh, safe), safe.flatten()
    s, inside = _clamped(torch.bmm(k_g, q_c.unsqueeze(-1)).squeeze(-1), keep, scale, clamp)
    p = torch.exp(s - lse_c[:, None])
    dp = torch.bmm(v_g, do_c.unsqueeze(-1)).squeeze(-1)
    ds = (p * (dp - delta_c[:, None])).masked_fill_(~inside, 0.0) * scale
    dk_bh.index_add_(0, flat, (ds.unsqueeze(-1) * q_c.unsqueeze(1)).flatten(0, 1))
    dv_bh.index_add_(0, flat, (p.unsqueeze(-1) * do_c.unsqueeze(1)).flatten(0, 1))
    return torch.bmm(ds.unsqueeze(1), k_g).squeeze(1)


def _fwd_torch(q, k, v, idx, scale: float, clamp: float):
    b, n, h, d = q.shape
    gqa, acc = h // k.shape[2], _acc(q.dtype)
    out = torch.empty(b, n, h, d, dtype=acc, device=q.device)
    lse = torch.empty(b, h, n, dtype=acc, device=q.device)
    chunk = _rows_chunk(n, idx.shape[-1], d)
    for bi in range(b):
        for hi in range(h):
            q_bh = q[bi, :, hi].to(acc)
            k_bh, v_bh = (x[bi, :, hi // gqa].to(acc).contiguous() for x in (k, v))
            for c0 in range(0, n, chunk):
                o_c, l_c = _chunk_fwd(q_bh[c0 : c0 + chunk], k_bh, v_bh, idx[bi, hi, c0 : c0 + chunk], scale, clamp)
                out[bi, c0 : c0 + chunk, hi], lse[bi, hi, c0 : c0 + chunk] = o_c, l_c
    return out.to(q.dtype), lse


def _bwd_torch(dout, q, k, v, out, lse, idx, scale: float, clamp: float):
    b, n, h, d = q.shape
    gqa, acc = h // k.shape[2], _acc(q.dtype)
    dq = torch.empty(b, n, h, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # [B, N, H]
    lse = lse.to(acc).masked_fill(lse == float("-inf"), 0.0)
    chunk = _rows_chunk(n, idx.shape[-1], d)
    for bi in range(b):
        for hi in range(h):
            q_bh, do_bh = q[bi, :, hi].to(acc), dout[bi, :, hi].to(acc)
            k_bh, v_bh = (x[bi, :, hi // gqa].to(acc).contiguous() for x in (k, v))
            dk_bh, dv_bh = torch.zeros_like(k_bh), torch.zeros_like(v_bh)
            for c0 in range(0, n, chunk):
                sl = slice(c0, c0 + chunk)
                dq[bi, sl, hi] = _chunk_bwd(
                    q_bh[sl], do_bh[sl], delta[bi, sl, hi], lse[bi, hi, sl], k_bh, v_bh, dk_bh, dv_bh,
                    idx[bi, hi, sl], scale, clamp,
                )  # fmt: skip
            dk[bi, :, hi // gqa] += dk_bh
            dv[bi, :, hi // gqa] += dv_bh
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def dense_mask(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The ``[B, H, N, N]`` boolean mask of the selected keys (tests and the reference only)."""
    mask = torch.zeros(*idx.shape[:-1], seq_len + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx >= 0, idx.long(), seq_len), True)  # empty slots land in a spare column
    return mask[..., :seq_len]


def sparse_attention_reference(q, k, v, idx, softmax_scale: float | None = None, clamp: float = 10.0):
    """Materialized attention over the selected keys, with autograd (float64-capable): ``(out, lse)``."""
    h, n = q.shape[2], q.shape[1]
    scale = default_scale(q.shape[-1], softmax_scale)
    kk, vv = (x.repeat_interleave(h // k.shape[2], dim=2).transpose(1, 2) for x in (k, v))
    s = (torch.matmul(q.transpose(1, 2), kk.transpose(-1, -2)) * scale).clamp(-clamp, clamp)
    s = s.masked_fill(~dense_mask(idx, n), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return torch.matmul(p, vv).transpose(1, 2), lse


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale, clamp, backend):
        if backend == "triton":
            from lsts.kernels.spt import triton as spt_triton

            out, lse = spt_triton.sparse_attention_fwd(q, k, v, idx, scale, clamp)
        else:
            out, lse = _fwd_torch(q, k, v, idx, scale, clamp)
        ctx.save_for_backward(q, k, v, out, lse, idx)
        ctx.args = (scale, clamp, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, idx = ctx.saved_tensors
        scale, clamp, backend = ctx.args
        if backend == "triton":
            from lsts.kernels.spt import triton as spt_triton

            dq, dk, dv = spt_triton.sparse_attention_bwd(dout, q, k, v, out, lse, idx, scale, clamp)
        else:
            dq, dk, dv = _bwd_torch(dout, q, k, v, out, lse, idx, scale, clamp)
        return dq, dk, dv, None, None, None, None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    softmax_scale: float | None = None,
    clamp: float = 10.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, N, H, D]`` over the keys ``idx [B, H, N, L]`` (`select_keys`) of
    ``k, v [B, N, H_kv, D]``: ``(out [B, N, H, D], lse [B, H, N])``, differentiable in q, k, v."""
    check_qkv(q, k, v)
    b, n, h, _ = q.shape
    if k.shape[1] != n:
        raise ValueError(f"sparse attention is self-attention: q has {n} positions, k {k.shape[1]}")
    if idx.dim() != 4 or tuple(idx.shape[:3]) != (b, h, n) or idx.dtype != torch.int32:
        raise ValueError(f"idx must be int32 [B, H, N, L] = [{b}, {h}, {n}, L], got {idx.dtype} {tuple(idx.shape)}")
    if not 0 < clamp <= 40:
        raise ValueError(f"clamp must be in (0, 40] (logits are bounded by it), got {clamp}")
    backend = resolve_backend(backend, q.device, "spt sparse attention", _SUPPORTED)
    scale = default_scale(q.shape[-1], softmax_scale)
    if backend == "reference":
        return sparse_attention_reference(q, k, v, idx, scale, clamp)
    return _SparseAttention.apply(q, k, v, idx.contiguous(), scale, float(clamp), backend)


__all__ = [
    "budget_for",
    "dense_mask",
    "select_keys",
    "select_keys_reference",
    "sparse_attention",
    "sparse_attention_reference",
]
