"""Ring attention with online softmax (``docs/algorithms.md`` §3), and the one ring loop of lsts.

`ring_pass` circulates a block round the ring (send to r+1, receive from r-1), posting the next
transfer before visiting the current block so communication hides behind compute. The backward
twin `ring_pass_with_grad` also circulates a gradient accumulator with each block, so after P steps
every rank holds the full gradient of its own block. Ring attention and RSA are both written as
visits on these two loops.

Ring attention: each rank keeps its query shard; K and V travel packed in one message (only the
``H_kv`` heads: GQA); each step computes only the unmasked tiles of `ring_tiles` and folds them into
float32 accumulators with the merge rule. The backward of every tile uses the *global* out and lse
of its queries, which makes it exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from lsts.kernels.attention import (
    Documents,
    Span,
    as_documents,
    attend_rows,
    attention_bwd,
    attention_fwd,
    document_rows,
    span_of,
)
from lsts.kernels.attention.documents import document_fields
from lsts.kernels.attention.merge import merge_into
from lsts.kernels.attention.sinks import add_sinks, sinks_grad
from lsts.parallel.checks import attention_setup
from lsts.parallel.comm import RingComm
from lsts.parallel.halo import halo_applies, halo_attention
from lsts.parallel.sharding import DOCUMENT_LAYOUTS, check_document_layout, shard_chunks, tiles


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def ring_pass(comm: RingComm, block: torch.Tensor, visit: Callable[[int, torch.Tensor], None]) -> None:
    """Call ``visit(src, block_of_src)`` for every rank's block, our own first (P - 1 messages)."""
    for step in range(comm.world):
        if step + 1 < comm.world:
            incoming = comm.send_recv(block)
        visit((comm.rank - step) % comm.world, block)
        if step + 1 < comm.world:
            comm.wait()
            block = incoming


def ring_pass_with_grad(
    comm: RingComm,
    grad_comm: RingComm,
    block: torch.Tensor,
    visit: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Like `ring_pass`, where ``visit`` returns this rank's gradient contribution to the visited
    block as a fresh tensor (it is accumulated into in place and sent on). The contributions travel
    with the block; returns the complete gradient of our own block."""
    travelling = None
    for step in range(comm.world):
        if step + 1 < comm.world:
            incoming = comm.send_recv(block)
        grad = visit((comm.rank - step) % comm.world, block)
        if travelling is not None:
            grad_comm.wait()  # the block's gradient from the ranks it visited before us
            grad += travelling
        travelling = grad_comm.send_recv(grad) if comm.world > 1 else grad
        if step + 1 < comm.world:
            comm.wait()
            block = incoming
    if comm.world > 1:
        grad_comm.wait()  # after P steps our own block's gradient has come home
    return travelling


def ring_forward(
    q, k, v, comm: RingComm, layout: str, span: Span, scale: float, backend: str, docs=None, softcap=0.0, sinks=None
):
    """Forward: ``(out [B, S, H, D] in q.dtype, lse [B, H, S] float32/64)``; ``sinks`` apply once,
    to the merged result of all P steps."""
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)

    def visit(src: int, kv: torch.Tensor) -> None:
        for t in tiles(layout, comm.rank, src, comm.world, s, span, docs):
            qt, kt, vt = q[:, t.q], kv[0][:, t.k], kv[1][:, t.k]
            o, l = attention_fwd(
                qt, kt, vt, scale, t.span, backend, t.q_offset, t.k_offset, docs, softcap, unrounded=True
            )
            merge_into(out[:, t.q], lse[:, :, t.q], o, l)

    ring_pass(comm, torch.stack([k, v]), visit)
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return out.to(q.dtype), lse


def ring_backward(
    dout, q, k, v, out, lse, comm: RingComm, grad_comm: RingComm, layout, span, scale, backend, docs, softcap=0.0
):
    """Backward: ``(dq, dk, dv)`` of this rank's shards (``out`` and ``lse`` with the sinks applied,
    if any: the same backward is then exact)."""
    s = q.shape[1]
    dq = torch.zeros(q.shape, dtype=acc_dtype(q.dtype), device=q.device)

    def visit(src: int, kv: torch.Tensor) -> torch.Tensor:
        dkv = torch.zeros(kv.shape, dtype=acc_dtype(q.dtype), device=q.device)
        for t in tiles(layout, comm.rank, src, comm.world, s, span, docs):
            rows = (dout[:, t.q], q[:, t.q], kv[0][:, t.k], kv[1][:, t.k], out[:, t.q], lse[:, :, t.q])
            dq_t, dk_t, dv_t = attention_bwd(
                *rows, scale, t.span, backend, t.q_offset, t.k_offset, docs, softcap, unrounded=True
            )
            dq[:, t.q] += dq_t
            dkv[0][:, t.k] += dk_t
            dkv[1][:, t.k] += dv_t
        return dkv

    dkv = ring_pass_with_grad(comm, grad_comm, torch.stack([k, v]), visit)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, group, layout, span, scale, backend, docs, softcap):
        out, lse = ring_forward(q, k, v, RingComm(group), layout, span, scale, backend, docs, softcap, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.args = (group, layout, span, scale, backend, docs, softcap)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group, *args = ctx.args
        dout = dout.contiguous()
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, RingComm(group), RingComm(group), *args)
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)  # this rank's queries' part
        return dq, dk, dv, dsinks, *[None] * 7


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    span: Span | None = None,
    cu_seqlens: torch.Tensor | list[int] | Documents | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
):
    """Online-softmax ring attention over the sequence-parallel ``group``.

    ``q [B, S_local, H, D]``, ``k, v [B, S_local, H_kv, D]``: this rank's shard under ``layout``
    (see `shard_sequence`). Returns ``out [B, S_local, H, D]``, and ``lse [B, H, S_local]`` (float32)
    when ``return_lse``. Inputs are checked on every rank before any data moves.

    ``span`` (a `Span`; overrides ``causal``) and ``cu_seqlens`` (document boundaries of the
    *global* packed sequence, the same on every rank; per batch row as a 2-D tensor or a list of
    lists, see `lsts.kernels.attention.attention`) need layout zigzag, contiguous or balanced
    (which needs ``cu_seqlens``, one list for the batch, the one its shards were cut by): each ring
    step attends only the pairs of contiguous runs the span and documents can reach, at their
    global offsets.
    On zigzag and contiguous shards, window, block, S² and SF spans whose reach fits inside a run
    skip the ring (balanced shards take the ring, visiting only the runs in reach): a halo exchange with
    the neighbours brings the few keys they need, and rank 0 sends SF's sinks once
    (`lsts.parallel.halo`), so traffic is ∝ the span, not N.

    ``softcap`` and ``sinks [H]`` as in `lsts.kernels.attention.attention`. A sink is applied once to
    each query's merged result; ``sinks.grad`` on a rank holds the part of its own queries (sum it
    over the group as for any replicated parameter, which data-parallel engines over the
    sequence-parallel ranks do).
    """
    span = span_of(causal, span)
    rows = document_rows(cu_seqlens, q.shape[0])
    if rows is not None:  # each row its own documents
        kw = dict(group=group, layout=layout, softmax_scale=softmax_scale, backend=backend, span=span)
        kw.update(softcap=softcap, sinks=sinks)
        return attend_rows(ring_attention, rows, q, k, v, with_lse=return_lse, return_lse=True, **kw)
    world = dist.get_world_size(group) if dist.is_initialized() else 1

    docs = as_documents(cu_seqlens, q.device, q.shape[1] * world)  # (a bad one raises before any collective)

    def check_span(world: int) -> None:
        if cu_seqlens is not None or span.kind not in ("causal", "full") or layout in DOCUMENT_LAYOUTS:
            check_document_layout(layout, docs)
            shard_chunks(layout, 0, world, q.shape[1], docs)  # a layout with runs, or a clear error

    scale, backend = attention_setup(
        q, k, v, group, layout, span, softmax_scale, backend, extra_check=check_span,
        extra_fields=document_fields(docs), softcap=softcap, sinks=sinks,
    )  # fmt: skip
    softcap = float(softcap)
    if halo_applies(span, layout, q.shape[1], world):
        out, lse = halo_attention(q, k, v, group, layout, span, scale, backend, docs, softcap, sinks)
    else:
        out, lse = _RingAttention.apply(q, k, v, sinks, group, layout, span, scale, backend, docs, softcap)
    return (out, lse) if return_lse else out
