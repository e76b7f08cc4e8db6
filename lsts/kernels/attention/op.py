"""Local attention as a ``torch.library`` custom op, for ``torch.compile``.

Under compilation the kernels' host-side planning (which key tiles a span and the packed documents
reach) would read tensor values, which a graph cannot: `attention` in ``__init__`` routes through
``lsts::attention_fwd`` / ``lsts::attention_bwd`` instead, opaque ops with fake (shape-only)
implementations and a registered autograd formula, so a transformer block compiles whole. Eager
calls keep the plain autograd Function (same kernels, same numbers).

A `Span` crosses the op boundary as its fields, `Documents` as their three tensors (tensors, not
constants: a new batch's documents do not recompile the graph).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsts.kernels.attention.documents import Documents
from lsts.kernels.attention.sinks import add_sinks, sinks_grad
from lsts.kernels.attention.spans import Span


def _span(kind: str, size: int, n_sink: int, shift_from: int) -> Span:
    return Span(kind, size, n_sink, None if shift_from < 0 else shift_from)


def _docs(bounds: list[Tensor]) -> Documents | None:
    return Documents(*bounds) if bounds else None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("lsts::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, scale: float, span: list[int], kind: str, backend: str,
    q_offset: int, k_offset: int, docs: list[Tensor], softcap: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(out, lse)`` of `lsts.kernels.attention.attention_fwd`, sinks applied. ``span`` is
    ``[size, n_sink, shift_from or -1]`` of a span of ``kind``."""
    from lsts.kernels.attention import attention_fwd

    out, lse = attention_fwd(q, k, v, scale, _span(kind, *span), backend, q_offset, k_offset, _docs(docs), softcap)
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return out.contiguous(), lse.contiguous()


@attention_fwd_op.register_fake
def _(q, k, v, sinks, scale, span, kind, backend, q_offset, k_offset, docs, softcap):
    b, s, h, _ = q.shape
    return q.new_empty(b, s, h, v.shape[-1]), q.new_empty(b, h, s, dtype=_acc(q.dtype))


@torch.library.custom_op("lsts::attention_bwd", mutates_args=())
def attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, sinks: Tensor | None, scale: float,
    span: list[int], kind: str, backend: str, q_offset: int, k_offset: int, docs: list[Tensor], softcap: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dq, dk, dv, dsinks)``; ``dsinks`` is empty without sinks."""
    from lsts.kernels.attention import attention_bwd

    span_ = _span(kind, *span)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, scale, span_, backend, q_offset, k_offset, _docs(docs), softcap)
    dsinks = q.new_empty(0) if sinks is None else sinks_grad(dout, out, lse, sinks)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsinks


@attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, sinks, scale, span, kind, backend, q_offset, k_offset, docs, softcap):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _tensor_list(a) -> bool:
    return isinstance(a, list) and all(isinstance(x, Tensor) for x in a)


def _setup(ctx, inputs, output):
    q, k, v, sinks, *args = inputs
    ctx.save_for_backward(q, k, v, *output, sinks)
    ctx.args = args


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = attention_bwd_op(dout, q, k, v, out, lse, sinks, *ctx.args)
    # One None per input, with the inputs' structure (a list of tensors is a list, a list of ints a leaf).
    no_grad = [[None] * len(a) if _tensor_list(a) else None for a in ctx.args]
    return dq, dk, dv, (None if sinks is None else dsinks), *no_grad


attention_fwd_op.register_autograd(_backward, setup_context=_setup)


def compiled_attention(q, k, v, sinks, scale: float, span: Span, backend: str, q_offset, k_offset, docs, softcap):
    """What `lsts.kernels.attention.attention` runs under ``torch.compile``: ``(out, lse)``."""
    fields = [span.size, span.n_sink, -1 if span.shift_from is None else span.shift_from]
    bounds = [] if docs is None else [docs.start, docs.end, docs.cu]
    out, lse = attention_fwd_op(q, k, v, sinks, scale, fields, span.kind, backend, q_offset, k_offset, bounds, softcap)
    return out, lse.detach()


__all__ = ["attention_bwd_op", "attention_fwd_op", "compiled_attention"]
