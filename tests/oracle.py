"""The oracle of the attention tests: explicit softmax attention written out here, head by head, in
float64, with every gradient from autograd. It shares no code with `lsts.kernels.attention` (the
reference backend included), so a bug there cannot hide in the expected values."""

from __future__ import annotations

import torch


def explicit_attention(q, k, v, keep: torch.Tensor, scale: float):
    """``out [B, Sq, H, D]`` and ``lse [B, H, Sq]`` of softmax attention in the dtype of the inputs.

    ``keep`` is a boolean ``[Sq, Sk]`` or ``[Hm, Sq, Sk]`` (``Hm`` 1 or H) keep-mask; K/V head ``h // (H /
    H_kv)`` serves query head ``h`` (grouped-query attention). A row that keeps no key has ``out = 0`` and
    ``lse = -inf`` and contributes no gradient."""
    n_heads, n_kv = q.shape[2], k.shape[2]
    keep = keep if keep.dim() == 3 else keep[None]
    outs, lses = [], []
    for h in range(n_heads):
        kv = h // (n_heads // n_kv)
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, kv]) * scale
        row_keep = keep[h % keep.shape[0]]
        empty = ~row_keep.any(-1)  # [Sq]
        # An empty row gets zeros before the logsumexp (no -inf - -inf in the backward) and p = 0 after.
        scores = scores.masked_fill(~row_keep, float("-inf")).masked_fill(empty[:, None], 0.0)
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - lse[..., None]) * row_keep
        outs.append(torch.einsum("bqk,bkd->bqd", p, v[:, :, kv]))
        lses.append(lse.masked_fill(empty, float("-inf")))
    return torch.stack(outs, dim=2), torch.stack(lses, dim=1)


def full_attention(q, k, v, dout, causal: bool, scale: float | None = None):
    """Returns ``out, lse, dq, dk, dv`` of explicit attention over the whole sequence, all float64."""
    q, k, v, dout = (x.detach().double().requires_grad_() for x in (q, k, v, dout))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sq, sk = q.shape[1], k.shape[1]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if causal:  # top-left aligned: query i sees keys 0..i
        keep = torch.tril(keep)
    out, lse = explicit_attention(q, k, v, keep, scale)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse.detach(), dq, dk, dv


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float64)."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
