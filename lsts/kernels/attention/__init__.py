"""Local attention that returns ``(out, lse)``: the one primitive every attention path is built on.

Backends (see `lsts.kernels.backend`):

- ``"torch"``: PyTorch's fused flash-attention CPU kernel (``cpu.py``): linear memory, CPU tensors.
- ``"reference"``: materialized scores in pure PyTorch (``reference.py``): any device, float64, any
  mask; the oracle of the tests.
- ``"triton"``: FlashAttention-2 style Triton kernels (``triton.py``) with span masks; CUDA, or CPU
  tensors under Triton's interpreter.
- ``"auto"``: ``"triton"`` on CUDA, ``"torch"`` on CPU.

Layout: ``q [B, Sq, H, D]``, ``k, v [B, Sk, H_kv, D]`` with ``H % H_kv == 0`` (GQA);
``lse [B, H, Sq]`` in float32 (float64 for float64 inputs). Masks are spans (`spans.Span`: full,
causal, window, block, LongLoRA S², SinkLoRA SF) evaluated at global positions, so the same call
serves a whole sequence, a ring step or any two blocks of a sharded sequence.
"""

from __future__ import annotations

import math

import torch

from lsts.kernels.attention import cpu, reference
from lsts.kernels.attention.documents import Documents, attend_rows, document_rows
from lsts.kernels.attention.merge import merge_into
from lsts.kernels.attention.spans import Span
from lsts.kernels.backend import resolve_backend as _resolve

__all__ = [
    "CAUSAL",
    "FULL",
    "Documents",
    "Span",
    "attend_rows",
    "attention",
    "attention_bwd",
    "attention_fwd",
    "document_rows",
    "merge_into",
    "resolve_backend",
]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete attention backend for ``device`` (`lsts.kernels.backend.resolve_backend`)."""
    resolved = _resolve(backend, device, "attention", supported=("triton", "torch", "reference"))
    if resolved == "torch" and device.type != "cpu":
        raise ValueError(f"attention backend 'torch' runs on CPU tensors, got device {device}; use 'reference'")
    return resolved


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


FULL, CAUSAL = Span("full"), Span("causal")


def _aligned_causal(span: Span, q, k, q_offset: int, k_offset: int) -> bool:
    """Causal with the diagonal where the fused kernel's top-left ``is_causal`` puts it."""
    return span.kind == "causal" and q_offset == k_offset and q.shape[1] == k.shape[1]


def _fused_cpu(span: Span, q, k, q_offset: int, k_offset: int, docs: Documents | None) -> bool:
    """The aten fused kernel takes the whole block: full, or causal on the diagonal, one document."""
    return docs is None and (span.kind == "full" or _aligned_causal(span, q, k, q_offset, k_offset))


def attention_fwd(
    q, k, v, softmax_scale: float, span: Span, backend: str, q_offset: int = 0, k_offset: int = 0, docs=None
):
    """Forward of one block: ``(out [B, Sq, H, D], lse [B, H, Sq])``. ``backend`` must be resolved.
    Query i and key j of the block sit at global positions ``q_offset + i`` and ``k_offset + j``;
    ``docs`` (`Documents`, global) keeps attention inside packed documents."""
    if backend == "triton":
        from lsts.kernels.attention import triton as triton_attention  # imports triton only when used

        return triton_attention.attention_fwd(q, k, v, softmax_scale, span, q_offset, k_offset, docs)
    if backend == "torch":
        if _fused_cpu(span, q, k, q_offset, k_offset, docs):
            return cpu.attention_fwd(q, k, v, softmax_scale, span.causal)
        return cpu.span_attention_fwd(q, k, v, softmax_scale, span, q_offset, k_offset, docs)
    mask = _reference_mask(span, q, k, q_offset, k_offset, docs)
    return reference.attention_fwd(q, k, v, softmax_scale, mask=mask)


def attention_bwd(
    dout, q, k, v, out, lse, softmax_scale: float, span: Span, backend: str, q_offset=0, k_offset=0, docs=None
):
    """Backward of one block given the queries' *global* ``out`` and ``lse``: ``(dq, dk, dv)``."""
    if backend == "triton":
        from lsts.kernels.attention import triton as triton_attention

        return triton_attention.attention_bwd(dout, q, k, v, out, lse, softmax_scale, span, q_offset, k_offset, docs)
    if backend == "torch":
        if _fused_cpu(span, q, k, q_offset, k_offset, docs):
            return cpu.attention_bwd(dout, q, k, v, out, lse, softmax_scale, span.causal)
        return cpu.span_attention_bwd(dout, q, k, v, out, lse, softmax_scale, span, q_offset, k_offset, docs)
    mask = _reference_mask(span, q, k, q_offset, k_offset, docs)
    return reference.attention_bwd(dout, q, k, v, out, lse, softmax_scale, mask=mask)


def _reference_mask(span: Span, q, k, q_offset: int, k_offset: int, docs: Documents | None) -> torch.Tensor | None:
    if span.kind == "full" and docs is None:
        return None
    q_pos = torch.arange(q.shape[1], device=q.device) + q_offset
    k_pos = torch.arange(k.shape[1], device=q.device) + k_offset
    mask = span.mask(q_pos, k_pos, q.shape[2])
    if docs is not None:
        mask = mask & docs.mask(q_pos, k_pos)
    return mask[None]  # [1, H or 1, Sq, Sk]


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, span, backend, q_offset, k_offset, docs):
        out, lse = attention_fwd(q, k, v, softmax_scale, span, backend, q_offset, k_offset, docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (softmax_scale, span, backend, q_offset, k_offset, docs)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape, dtype and device agreement of one rank's q, k, v; ValueError naming what is wrong."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) for GQA")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    span: Span | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    cu_seqlens: torch.Tensor | list[int] | Documents | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable local attention: ``(out [B, Sq, H, D], lse [B, H, Sq])``; ``lse`` carries no
    gradient. ``span`` (see `Span`) overrides ``causal``; masks are evaluated at the global positions
    ``q_offset + i`` and ``k_offset + j``, so any two blocks of a longer sequence can be attended.

    ``cu_seqlens`` (varlen): boundaries ``[0, ..., N]`` of documents packed in the *global*
    sequence (or a prepared `Documents`); attention then stays inside each document. One list is
    shared by every row of the batch; a 2-D ``[B, n + 1]`` tensor or a list of per-row lists gives
    each row its own (one call per distinct row documents). A query with no visible key gets
    ``out = 0`` and ``lse = -inf``."""
    if softcap or sinks is not None:
        raise ValueError("softcap / sinks: not implemented yet")
    rows = document_rows(cu_seqlens, q.shape[0])
    if rows is not None:
        kw = dict(causal=causal, softmax_scale=softmax_scale, backend=backend, span=span, q_offset=q_offset)
        return attend_rows(attention, rows, q, k, v, with_lse=True, k_offset=k_offset, **kw)
    check_qkv(q, k, v)
    span = span if span is not None else (CAUSAL if causal else FULL)
    backend = resolve_backend(backend, q.device)
    scale = default_scale(q.shape[-1], softmax_scale)
    docs = as_documents(cu_seqlens, q.device, q_offset + q.shape[1], k_offset + k.shape[1])
    return _LocalAttention.apply(q, k, v, scale, span, backend, int(q_offset), int(k_offset), docs)


def as_documents(cu_seqlens, device, *extents: int) -> Documents | None:
    """`Documents` from ``cu_seqlens`` (or as given) on ``device``; ValueError when they do not
    cover every global position in ``extents`` (the end of the query and key blocks)."""
    if cu_seqlens is None:
        return None
    docs = cu_seqlens if isinstance(cu_seqlens, Documents) else Documents.from_cu_seqlens(cu_seqlens)
    if max(extents) > docs.seq_len:
        raise ValueError(
            f"cu_seqlens covers {docs.seq_len} positions but the blocks reach position {max(extents)}; "
            f"its last entry must be the global sequence length"
        )
    return docs.to(device)
