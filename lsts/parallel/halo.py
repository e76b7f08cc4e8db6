"""Halo exchange: window and block spans under context parallelism with neighbour traffic only.

A query at global position i of a window span sees keys ``i-w+1 .. i``; of a block span, the keys
of its block since the block's start. So each contiguous run of a shard (one under the contiguous
layout, two under zigzag) needs only the ``width = size - 1`` tokens of K/V just before it, which
live on one neighbouring rank (or, for zigzag's second run on the middle rank, on itself). One
exchange of those tokens replaces the ring's P - 1 full K/V steps: bytes ∝ w, not N.

The exchange is differentiable: its backward sends the halo's dK/dV back to the ranks that own
those tokens. Attention then runs locally on ``[halo, run]`` keys at their global offsets, so the
span mask (and packed documents) are evaluated exactly as on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lsts.kernels.attention import Documents, Span
from lsts.kernels.attention import attention as local_attention
from lsts.parallel.sharding import shard_chunks


def halo_width(span: Span) -> int:
    """Keys before a run that its queries may need (0 for spans the halo does not serve)."""
    return span.size - 1 if span.kind in ("window", "block") else 0


def halo_applies(span: Span, layout: str, s_local: int, world: int) -> bool:
    """The halo serves window and block spans whose width fits inside one run of a shard."""
    if span.kind not in ("window", "block") or layout not in ("contiguous", "zigzag") or world == 1:
        return False
    run = s_local // 2 if layout == "zigzag" else s_local
    return halo_width(span) <= run


def _plan(layout: str, rank: int, world: int, s_local: int, width: int):
    """Per run: (local slice, global start, source of its halo) where the source is
    ("recv", peer), ("local", slice of our own tokens) or None (the sequence starts there); and the
    sends: (peer, local slice of our tokens to send)."""
    runs = shard_chunks(layout, rank, world, s_local)
    plan, sends = [], []
    if layout == "contiguous":
        (rows, first), *_ = runs
        plan.append((rows, first, ("recv", rank - 1) if rank > 0 else None))
        if rank < world - 1:
            sends.append((rank + 1, slice(s_local - width, s_local)))
        return plan, sends
    (a_rows, a_first), (b_rows, b_first) = runs
    plan.append((a_rows, a_first, ("recv", rank - 1) if rank > 0 else None))
    # Run B (global chunk 2P-1-r) follows chunk 2P-2-r: rank r+1's run B, or our own run A on the last rank.
    plan.append((b_rows, b_first, ("recv", rank + 1) if rank < world - 1 else ("local", _tail(a_rows, width))))
    if rank < world - 1:
        sends.append((rank + 1, _tail(a_rows, width)))
    if rank > 0:
        sends.append((rank - 1, _tail(b_rows, width)))
    return plan, sends


def _tail(rows: slice, width: int) -> slice:
    return slice(rows.stop - width, rows.stop)


def _exchange(group, outgoing: list[tuple[int, torch.Tensor]], incoming: list[tuple[int, torch.Tensor]]) -> None:
    """One batch of P2P sends and receives (peers are ranks of ``group``)."""
    group = group or dist.group.WORLD
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, p), group) for p, t in outgoing]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, p), group) for p, t in incoming]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _Halo(torch.autograd.Function):
    """``kv [2, B, S_local, H_kv, D]`` -> ``(kv, *halos received)``. ``kv`` passes through so that
    every rank, also one that receives nothing, takes part in the backward exchange."""

    @staticmethod
    def forward(ctx, kv, group, width, sources, sends):
        shape = (*kv.shape[:2], width, *kv.shape[3:])
        recvs = [(peer, kv.new_empty(shape)) for peer in sources]
        _exchange(group, [(peer, kv[:, :, rows]) for peer, rows in sends], recvs)
        ctx.args = (group, width, sources, sends)
        return (kv.view_as(kv), *(t for _, t in recvs))

    @staticmethod
    def backward(ctx, grad_kv, *grad_halos):
        group, width, sources, sends = ctx.args
        grad_kv = grad_kv.clone()
        grad_halos = [g if g is not None else grad_kv.new_zeros(grad_kv[:, :, :width].shape) for g in grad_halos]
        back = [(peer, grad_kv.new_empty(grad_kv[:, :, rows].shape)) for peer, rows in sends]
        _exchange(group, list(zip(sources, grad_halos)), back)  # halo gradients go home
        for (_, rows), (_, g) in zip(sends, back):
            grad_kv[:, :, rows] += g
        return grad_kv, None, None, None, None


def halo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    layout: str,
    span: Span,
    softmax_scale: float,
    backend: str,
    docs: Documents | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a window or block span over a sharded sequence (see `halo_applies`);
    inputs as in `ring_attention`, already validated by the caller."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    width = halo_width(span)
    plan, sends = _plan(layout, rank, world, q.shape[1], width)
    sources = [src[1] for *_, src in plan if src is not None and src[0] == "recv"]
    kv, *halos = _Halo.apply(torch.stack([k, v]), group, width, sources, sends)
    halos = iter(halos)
    outs, lses = [], []
    for rows, first, src in plan:
        keys, k_first = kv[:, :, rows], first
        if src is not None:
            before = next(halos) if src[0] == "recv" else kv[:, :, src[1]]
            keys, k_first = torch.cat([before, keys], dim=2), first - width
        out, lse = local_attention(
            q[:, rows], keys[0], keys[1], softmax_scale=softmax_scale, backend=backend, span=span,
            q_offset=first, k_offset=k_first, cu_seqlens=docs,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


__all__ = ["halo_applies", "halo_attention", "halo_width"]
