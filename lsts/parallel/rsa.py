"""Ring Self-Attention (RSA), the seed method of "Sequence Parallelism: Long Sequence Training from
System Perspective" (``docs/algorithms.md`` §2), kept for fidelity and as the memory baseline.

Contiguous layout. Ring 1 passes K round so each rank builds its full score rows ``[S_local, N]``;
an exact softmax follows; ring 2 passes V round and accumulates the output. The probabilities are
materialized and saved for backward, so memory per rank is O(N^2 / P): the cost that online-softmax
ring attention removes. Backward runs the two rings again, each block carrying its dV or dK home
(`ring_pass_with_grad`). The scale is ``1/sqrt(head_dim)`` (one public implementation used the
hidden size).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lsts.kernels.attention import CAUSAL, Span
from lsts.kernels.attention.reference import expand_kv, fold_kv
from lsts.parallel.checks import attention_setup
from lsts.parallel.comm import RingComm
from lsts.parallel.ring import acc_dtype, ring_pass, ring_pass_with_grad


def _rows(p: torch.Tensor, src: int, s: int) -> torch.Tensor:
    """The key columns of block ``src`` in a ``[B, H, S_local, N]`` score matrix."""
    return p[..., src * s : (src + 1) * s]


def _rsa_forward(q, k, v, comm: RingComm, causal: bool, scale: float):
    b, s, h, d = q.shape
    acc = acc_dtype(q.dtype)
    qa = q.to(acc)
    probs = torch.empty(b, h, s, s * comm.world, dtype=acc, device=q.device)

    def scores(src, k_blk):
        _rows(probs, src, s).copy_(torch.einsum("bqhd,bkhd->bhqk", qa, expand_kv(k_blk.to(acc), h)))

    ring_pass(comm, k, scores)
    probs.mul_(scale)
    if causal:
        q_pos = comm.rank * s + torch.arange(s, device=q.device)
        future = torch.arange(s * comm.world, device=q.device)[None, :] > q_pos[:, None]
        probs.masked_fill_(future, float("-inf"))
    lse = torch.logsumexp(probs, dim=-1)
    probs.sub_(lse.unsqueeze(-1)).exp_()
    out = torch.zeros(b, s, h, d, dtype=acc, device=q.device)

    def accumulate(src, v_blk):
        out.add_(torch.einsum("bhqk,bkhd->bqhd", _rows(probs, src, s), expand_kv(v_blk.to(acc), h)))

    ring_pass(comm, v, accumulate)
    return out, lse, probs


def _rsa_backward(dout, q, k, v, out, probs, comm: RingComm, grad_comm: RingComm, scale: float):
    s, h, n_kv = q.shape[1], q.shape[2], k.shape[2]
    acc = probs.dtype
    qa, doa = q.to(acc), dout.to(acc)
    dp = torch.empty_like(probs)

    def grad_v(src, v_blk):
        # dP = dO V^T for this key block; dV = P^T dO travels home with V.
        _rows(dp, src, s).copy_(torch.einsum("bqhd,bkhd->bhqk", doa, expand_kv(v_blk.to(acc), h)))
        return fold_kv(torch.einsum("bhqk,bqhd->bkhd", _rows(probs, src, s), doa), n_kv)

    dv = ring_pass_with_grad(comm, grad_comm, v, grad_v)
    delta = (doa * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # rowsum(dO * O) = rowsum(P * dP)
    ds = dp.sub_(delta).mul_(probs)  # dS, in the dP buffer: masked entries have P = 0
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)

    def grad_k(src, k_blk):
        dq.add_(torch.einsum("bhqk,bkhd->bqhd", _rows(ds, src, s), expand_kv(k_blk.to(acc), h)))
        return fold_kv(torch.einsum("bhqk,bqhd->bkhd", _rows(ds, src, s), qa), n_kv) * scale

    dk = ring_pass_with_grad(comm, grad_comm, k, grad_k)
    return (dq * scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale):
        out, lse, probs = _rsa_forward(q, k, v, RingComm(group), causal, scale)
        ctx.save_for_backward(q, k, v, out, probs)
        ctx.args = (group, scale)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, probs = ctx.saved_tensors
        group, scale = ctx.args
        dq, dk, dv = _rsa_backward(dout, q, k, v, out, probs, RingComm(group), RingComm(group), scale)
        return dq, dk, dv, None, None, None


def rsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    span: Span = CAUSAL,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
):
    """Two-ring Ring Self-Attention on the contiguous layout: ``q [B, S_local, H, D]``,
    ``k, v [B, S_local, H_kv, D]`` -> ``out [B, S_local, H, D]`` (and ``lse [B, H, S_local]``).
    Materializes ``[B, H, S_local, N]`` probabilities: O(N^2 / P) memory per rank. The seed method
    has only the causal and full spans and no ``softcap`` or ``sinks``: anything else is a
    `ValueError` (use `ring_attention`)."""

    def check(_world: int) -> None:
        if span.kind not in ("causal", "full"):
            raise ValueError(f"rsa_attention computes the causal and full spans only, got {span}; use ring_attention")
        if softcap or sinks is not None:
            raise ValueError("rsa_attention implements neither softcap nor sinks; use ring_attention for them")

    scale, _ = attention_setup(q, k, v, group, "contiguous", span, softmax_scale, "reference", extra_check=check)
    out, lse = _RingSelfAttention.apply(q, k, v, group, span.causal, scale)
    return (out, lse) if return_lse else out
