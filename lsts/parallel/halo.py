"""Halo exchange: window, block, S² and SF spans under context parallelism with neighbour traffic only.

Every span served here bounds how far back a query looks (``docs/algorithms.md`` §5-§7): a window the
previous w keys, a block its block's start, LongLoRA's S² (and SinkLoRA's SF) the start of its
group, shifted by G/2 on the second half of the heads. So each contiguous run of a shard (one under
the contiguous layout, two under zigzag) needs only the ``width`` tokens of K/V just before it,
which live on one neighbouring rank (or, for zigzag's second run on the last rank, on itself).
`halo_width` computes that width from the span and the layout alone (every rank gets the same value
without a collective). One exchange of those tokens replaces the ring's P - 1 full K/V steps:
bytes ∝ the span, not N. When S²/SF groups are aligned with the runs (the group a multiple of the
run, LongLoRA's G = N/4 with few ranks) the unshifted heads need nothing and the shifted heads need
G/2 tokens: only the half-groups that straddle ranks travel.

SF's sinks (the first ``n_sink`` tokens, inside rank 0's first run) are sent once by rank 0 to every
rank whose runs' key blocks start after them; a run attends them as a second key block, merged with
its main block ``[halo, run]`` by the (out, lse) rule of ``docs/algorithms.md`` §1. Its backward runs
each block with the queries' global out and lse, as ring attention does, so it is exact.

The exchange is differentiable: its backward sends the received tokens' dK/dV back to the ranks
that own them. Attention runs at global offsets, so the span mask (and packed documents) are
evaluated exactly as on one device.

S²/SF's two kinds of heads exchange separately, each only its own K/V heads over its own width, when
the GQA groups split with them (otherwise every K/V head travels over the wider width). Limits:
packed documents do not narrow the halo; spans wider than a run (S² with G = N/4 on 8 ranks) take
the ring.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from lsts.kernels.attention import Documents, Span, attention_bwd, attention_fwd, merge_into
from lsts.kernels.attention.sinks import add_sinks, sinks_grad
from lsts.parallel.sharding import shard_chunks

HALO_KINDS = ("window", "block", "s2", "sf")


def _run_length(layout: str, s_local: int) -> int:
    return s_local // 2 if layout == "zigzag" else s_local


def halo_width(span: Span, layout: str, s_local: int, world: int, n_heads: int | None = None) -> int:
    """Keys before a run that its queries may need: the largest ``first - lo`` over the runs of every
    rank, ``lo`` being the first key (sinks aside) any head of the run's queries reaches (any head of
    a call with ``n_heads`` heads, or any head at all). 0 for spans the halo does not serve. A pure
    function of its arguments: every rank computes the same."""
    if span.kind not in HALO_KINDS:
        return 0
    shifts = span.shifts(n_heads)
    width = 0
    for rank in range(world):
        for rows, first in shard_chunks(layout, rank, world, s_local):
            last = first + rows.stop - rows.start - 1
            lo = min(span.key_range(first, last, s)[0] for s in shifts)
            width = max(width, first - lo)
    return width


def halo_applies(span: Span, layout: str, s_local: int, world: int) -> bool:
    """The halo serves window, block, S² and SF spans on zigzag or contiguous shards over more than
    one rank when the halo fits inside one run (it then lives on one rank) and SF's sinks lie inside
    rank 0's first run."""
    if span.kind not in HALO_KINDS or layout not in ("contiguous", "zigzag") or world == 1:
        return False
    run = _run_length(layout, s_local)
    return halo_width(span, layout, s_local, world) <= run and span.n_sink <= run


@dataclass(frozen=True)
class _Run:
    """One contiguous run of this rank's shard and the key blocks its queries attend."""

    rows: slice  # local rows (queries, and the run's own keys)
    first: int  # global position of its first token
    halo: tuple[str, int | slice] | None  # ("recv", peer), ("local", our rows) or None: no halo
    n_sink: int  # sink rows attended as a second key block (0: none)


def _runs(span: Span, layout: str, rank: int, world: int, s_local: int, width: int) -> list[_Run]:
    chunks = shard_chunks(layout, rank, world, s_local)
    out = []
    for i, (rows, first) in enumerate(chunks):
        halo = None
        if width and first:  # a sequence's first run has nothing before it
            if i == 0:
                halo = ("recv", rank - 1)
            elif rank < world - 1:  # zigzag run B (chunk 2P-1-r) follows rank r+1's run B...
                halo = ("recv", rank + 1)
            else:  # ...or, on the last rank, our own run A (chunk P-1)
                halo = ("local", _tail(chunks[0][0], width))
        out.append(_Run(rows, first, halo, min(span.n_sink, max(0, first - width))))
    return out


def _tail(rows: slice, width: int) -> slice:
    return slice(rows.stop - width, rows.stop)


def _messages(span, layout, rank, world, s_local, width, runs):
    """``(sends, recvs)`` of this rank: ``sends`` (peer, our local rows), ``recvs`` (peer, rows,
    name). Halos come before sinks on both ends of every pair, the order `_exchange` relies on."""
    sends, recvs = [], []
    for i, run in enumerate(runs):
        if run.halo is not None and run.halo[0] == "recv":
            recvs.append((run.halo[1], width, f"halo{i}"))
    if width:
        chunks = shard_chunks(layout, rank, world, s_local)
        if rank < world - 1:  # our first run's tail opens rank r+1's first run
            sends.append((rank + 1, _tail(chunks[0][0], width)))
        if layout == "zigzag" and rank > 0:  # our second run's tail opens rank r-1's second run
            sends.append((rank - 1, _tail(chunks[1][0], width)))
    if span.n_sink:
        if rank == 0:
            for peer in range(1, world):
                need = max(r.n_sink for r in _runs(span, layout, peer, world, s_local, width))
                if need:
                    sends.append((peer, slice(0, need)))
        else:
            need = max(r.n_sink for r in runs)
            if need:
                recvs.append((0, need, "sinks"))
    return sends, recvs


def _exchange(group, outgoing: list[tuple[int, torch.Tensor]], incoming: list[tuple[int, torch.Tensor]]) -> None:
    """One batch of P2P sends and receives (peers are ranks of ``group``). The i-th message between
    two ranks in one direction gets tag i: NCCL matches messages by their order, which both ends list
    alike, and gloo by tag."""
    group = group or dist.group.WORLD
    ops = []
    for op, messages in ((dist.isend, outgoing), (dist.irecv, incoming)):
        count = Counter()
        for peer, t in messages:
            if op is dist.irecv and not t.is_contiguous():
                raise RuntimeError("a halo receive must land in the caller's buffer: pass a contiguous tensor")
            ops.append(dist.P2POp(op, t.contiguous(), dist.get_global_rank(group, peer), group, tag=count[peer]))
            count[peer] += 1
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _Exchange(torch.autograd.Function):
    """``kv [2, B, S_local, H_kv, D]`` -> ``(kv, *tokens received)``. ``kv`` passes through so that
    every rank, also one that receives nothing, takes part in the backward exchange."""

    @staticmethod
    def forward(ctx, kv, group, sends, recvs):
        incoming = [(peer, kv.new_empty((*kv.shape[:2], n, *kv.shape[3:]))) for peer, n in recvs]
        _exchange(group, [(peer, kv[:, :, rows]) for peer, rows in sends], incoming)
        ctx.args = (group, sends, recvs)
        return (kv.view_as(kv), *(t for _, t in incoming))

    @staticmethod
    def backward(ctx, grad_kv, *grad_received):
        group, sends, recvs = ctx.args
        grad_kv = grad_kv.clone()
        shape = lambda n: (*grad_kv.shape[:2], n, *grad_kv.shape[3:])  # noqa: E731
        grads = [g if g is not None else grad_kv.new_zeros(shape(n)) for g, (_, n) in zip(grad_received, recvs)]
        back = [(peer, grad_kv.new_empty(grad_kv[:, :, rows].shape)) for peer, rows in sends]
        _exchange(group, [(peer, g) for (peer, _), g in zip(recvs, grads)], back)  # gradients go home
        for (_, rows), (_, g) in zip(sends, back):
            grad_kv[:, :, rows] += g
        return grad_kv, None, None, None


class _BlocksAttention(torch.autograd.Function):
    """Queries against several disjoint key blocks ``kv [2, B, S_i, H_kv, D]`` at global offsets:
    forward merges the blocks' (out, lse), then applies the ``sinks`` (these are all the keys of the
    queries); backward runs each block with the global out and lse."""

    @staticmethod
    def forward(ctx, q, sinks, scale, span, backend, q_offset, k_offsets, docs, softcap, *kvs):
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_zeros(q.shape, dtype=acc)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc, device=q.device)
        for kv, k_offset in zip(kvs, k_offsets):
            o, l = attention_fwd(q, *kv, scale, span, backend, q_offset, k_offset, docs, softcap, unrounded=True)
            merge_into(out, lse, o, l)
        if sinks is not None:
            out, lse = add_sinks(out, lse, sinks)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, out, lse, sinks, *kvs)
        ctx.args = (scale, span, backend, q_offset, k_offsets, docs, softcap)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, out, lse, sinks, *kvs = ctx.saved_tensors
        scale, span, backend, q_offset, k_offsets, docs, softcap = ctx.args
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        dkvs = []
        for kv, k_offset in zip(kvs, k_offsets):
            dq_b, dk, dv = attention_bwd(
                dout, q, *kv, out, lse, scale, span, backend, q_offset, k_offset, docs, softcap, unrounded=True
            )
            dq += dq_b
            dkvs.append(torch.stack([dk, dv]).to(kv.dtype))
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        return dq.to(q.dtype), dsinks, *[None] * 7, *dkvs


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
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a window, block, S² or SF span over a sharded sequence (see
    `halo_applies`); inputs as in `ring_attention`, already validated by the caller.

    S² / SF heads of the two kinds go separately when the K/V heads split with them (GQA groups
    do not straddle the boundary): each kind exchanges only its own K/V heads over its own width,
    so aligned groups move G/2 tokens of the shifted heads' K/V and nothing for the others."""
    h, h_kv = q.shape[2], k.shape[2]
    first_shifted = span.first_shifted(h) if span.shifts_heads else h
    if 0 < first_shifted < h and first_shifted % (h // h_kv) == 0:
        kv_split = first_shifted // (h // h_kv)
        kinds = (
            (slice(0, first_shifted), slice(0, kv_split), first_shifted),  # none of them shifted
            (slice(first_shifted, h), slice(kv_split, h_kv), 0),  # all of them shifted
        )
        parts = []
        for heads, kv_heads, shift_from in kinds:
            kind_span = replace(span, shift_from=shift_from)
            qs, ks, vs = q[:, :, heads], k[:, :, kv_heads], v[:, :, kv_heads]
            kind_sinks = None if sinks is None else sinks[heads]
            parts.append(
                _halo_attention(qs, ks, vs, group, layout, kind_span, softmax_scale, backend, docs, softcap, kind_sinks)
            )
        return torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=1)
    return _halo_attention(q, k, v, group, layout, span, softmax_scale, backend, docs, softcap, sinks)


def _halo_attention(q, k, v, group, layout, span, softmax_scale, backend, docs, softcap, sinks):
    rank, world, s_local = dist.get_rank(group), dist.get_world_size(group), q.shape[1]
    width = halo_width(span, layout, s_local, world, q.shape[2])
    runs = _runs(span, layout, rank, world, s_local, width)
    sends, recvs = _messages(span, layout, rank, world, s_local, width, runs)
    kv, *received = _Exchange.apply(torch.stack([k, v]), group, sends, [(p, n) for p, n, _ in recvs])
    received = dict(zip((name for *_, name in recvs), received))
    outs, lses = [], []
    for i, run in enumerate(runs):
        blocks, offsets = [kv[:, :, run.rows]], [run.first]
        if run.halo is not None:
            before = received[f"halo{i}"] if run.halo[0] == "recv" else kv[:, :, run.halo[1]]
            blocks[0], offsets[0] = torch.cat([before, blocks[0]], dim=2), run.first - width
        if run.n_sink:  # sinks before the main block; on rank 0 they are our own first rows
            sink_kv = kv if rank == 0 else received["sinks"]
            blocks.append(sink_kv[:, :, : run.n_sink])
            offsets.append(0)
        q_run = q[:, run.rows]
        out, lse = _BlocksAttention.apply(
            q_run, sinks, softmax_scale, span, backend, run.first, tuple(offsets), docs, softcap, *blocks
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


__all__ = ["HALO_KINDS", "halo_applies", "halo_attention", "halo_width"]
