"""Pure-PyTorch attention that materializes the score matrix: the oracle of the tests.

Works in any floating dtype (float64 for tests), any mask, GQA. Memory is O(Sq * Sk) per head, so it
is only for small shapes. Backward takes the *global* ``out`` and ``lse`` and is the FlashAttention-2
partition backward (``docs/algorithms.md`` §1), so it also serves ring steps that see a part of the keys.
"""

from __future__ import annotations

import torch


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, S, H_kv, D] -> [B, S, H, D] by repeating each K/V head for its query group."""
    return x.repeat_interleave(n_heads // x.shape[2], dim=2)


def fold_kv(grad: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Inverse of `expand_kv` for gradients: sum the query group's contributions per K/V head."""
    b, s, h, d = grad.shape
    return grad.view(b, s, n_kv_heads, h // n_kv_heads, d).sum(dim=3)


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """Top-left aligned lower triangle [sq, sk] (True = keep), as `is_causal` in PyTorch SDPA."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()


def _scores(q, k, softmax_scale, causal, mask, softcap=0.0):
    """Scaled (then, with ``softcap``, capped: ``softcap * tanh(s / softcap)``) scores [B, H, Sq, Sk]
    with masked entries at -inf."""
    k = expand_kv(k, q.shape[2])
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        mask = (
            causal_mask(q.shape[1], k.shape[1], q.device)
            if mask is None
            else mask & causal_mask(q.shape[1], k.shape[1], q.device)
        )
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out [B, Sq, H, D]`` (dtype of q) and ``lse [B, H, Sq]`` (float32, or float64 for
    float64 inputs). ``mask`` is a boolean [Sq, Sk] or [B, H, Sq, Sk] (True = keep); a fully masked
    row gets ``out = 0`` and ``lse = -inf``. ``softcap`` > 0 caps the scaled scores (Gemma2)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = _scores(q.to(acc), k.to(acc), softmax_scale, causal, mask, softcap)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, expand_kv(v.to(acc), q.shape[2]))
    return out.to(q.dtype), lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the keys ``k, v`` (a subset of all keys is fine) given the global ``out`` and
    ``lse`` of the queries: D = rowsum(dO * O), P = exp(S - lse), dS = P * (dO V^T - D), times
    ``1 - tanh²`` under a ``softcap``."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qa, ka, va, doa = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = _scores(qa, ka, softmax_scale, causal, mask, softcap)
    p = torch.exp(s - lse.to(acc).masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    p = p.masked_fill(torch.isinf(s), 0.0)
    delta = (doa * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, Sq]
    v_full = expand_kv(va, q.shape[2])
    dp = torch.einsum("bqhd,bkhd->bhqk", doa, v_full)
    ds = p * (dp - delta.unsqueeze(-1))
    if softcap:  # s = c·tanh(x / c): ds/dx = 1 - tanh², 0 where masked (there ds is 0 and s is -inf)
        ds = ds * (1 - (s / softcap) ** 2).masked_fill(torch.isinf(s), 0.0)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, expand_kv(ka, q.shape[2])) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qa) * softmax_scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, doa)
    n_kv = k.shape[2]
    return dq.to(q.dtype), fold_kv(dk, n_kv).to(k.dtype), fold_kv(dv, n_kv).to(v.dtype)
