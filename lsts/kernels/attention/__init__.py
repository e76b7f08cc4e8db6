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

Logit softcapping (``softcap``, Gemma2) is a score transform every backend applies per block;
learnable sinks (``sinks``, gpt-oss) are applied once to the merged ``(out, lse)`` (`sinks`).
"""

from __future__ import annotations

import math

import torch

from lsts.kernels.attention import cpu, reference
from lsts.kernels.attention.documents import Documents, attend_rows, document_rows
from lsts.kernels.attention.merge import merge_into
from lsts.kernels.attention.sinks import add_sinks, check_softcap_sinks, sinks_grad
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
    "check_softcap_sinks",
    "document_rows",
    "merge_into",
    "resolve_backend",
    "span_of",
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


def span_of(causal: bool, span: Span | None) -> Span:
    """The span of a call that takes FlashAttention's ``causal`` flag beside ``span``: ``span`` when
    given (it overrides the flag), else causal or full. The public functions with ``causal=`` convert
    here, once; every internal entry point takes a `Span` only."""
    return span if span is not None else (CAUSAL if causal else FULL)


def _aligned_causal(span: Span, q, k, q_offset: int, k_offset: int) -> bool:
    """Causal with the diagonal where the fused kernel's top-left ``is_causal`` puts it."""
    return span.kind == "causal" and q_offset == k_offset and q.shape[1] == k.shape[1]


def _fused_cpu(span: Span, q, k, q_offset: int, k_offset: int, docs: Documents | None) -> bool:
    """The aten fused kernel takes the whole block: full, or causal on the diagonal, one document."""
    return docs is None and (span.kind == "full" or _aligned_causal(span, q, k, q_offset, k_offset))


def unrounded_inputs(unrounded: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the accumulation dtype (exact upcasts) when ``unrounded``: a torch / reference
    block then computes and returns in float32, so nothing is rounded to bf16 before the caller's sum."""
    if not unrounded:
        return tensors
    acc = torch.promote_types(tensors[0].dtype, torch.float32)
    return tuple(x.to(acc) for x in tensors)


def attention_fwd(
    q, k, v, softmax_scale: float, span: Span, backend: str, q_offset: int = 0, k_offset: int = 0, docs=None,
    softcap: float = 0.0, unrounded: bool = False,
):  # fmt: skip
    """Forward of one block: ``(out [B, Sq, H, D], lse [B, H, Sq])``. ``backend`` must be resolved.
    Query i and key j of the block sit at global positions ``q_offset + i`` and ``k_offset + j``;
    ``docs`` (`Documents`, global) keeps attention inside packed documents; ``softcap`` > 0 caps the
    scaled scores, ``softcap * tanh(s / softcap)``, before masking (Gemma2). Sinks are not a
    block's business: they apply once to the merged result (`sinks.add_sinks`). ``unrounded``:
    ``out`` in the accumulation dtype (float32 for bf16/fp16), for a caller that merges several
    blocks and rounds once (a ring step's partial output rounded to bf16 would add one rounding per step)."""
    if backend == "triton":
        from lsts.kernels.attention import triton as triton_attention  # imports triton only when used

        return triton_attention.attention_fwd(
            q, k, v, softmax_scale, span, q_offset, k_offset, docs, softcap, unrounded
        )
    q, k, v = unrounded_inputs(unrounded, q, k, v)
    if backend == "torch":
        if not softcap and _fused_cpu(span, q, k, q_offset, k_offset, docs):
            return cpu.attention_fwd(q, k, v, softmax_scale, span.causal)
        return cpu.span_attention_fwd(q, k, v, softmax_scale, span, q_offset, k_offset, docs, softcap)
    mask = _reference_mask(span, q, k, q_offset, k_offset, docs)
    return reference.attention_fwd(q, k, v, softmax_scale, mask=mask, softcap=softcap)


def attention_bwd(
    dout, q, k, v, out, lse, softmax_scale: float, span: Span, backend: str, q_offset=0, k_offset=0, docs=None,
    softcap: float = 0.0, unrounded: bool = False,
):  # fmt: skip
    """Backward of one block given the queries' *global* ``out`` and ``lse``: ``(dq, dk, dv)``.
    ``unrounded``: the gradients in the accumulation dtype, for a caller that sums several blocks'
    contributions (ring steps, halo blocks) and rounds once."""
    if backend == "triton":
        from lsts.kernels.attention import triton as triton_attention

        return triton_attention.attention_bwd(
            dout, q, k, v, out, lse, softmax_scale, span, q_offset, k_offset, docs, softcap, unrounded
        )
    dout, q, k, v, out = unrounded_inputs(unrounded, dout, q, k, v, out)
    if backend == "torch":
        if not softcap and _fused_cpu(span, q, k, q_offset, k_offset, docs):
            return cpu.attention_bwd(dout, q, k, v, out, lse, softmax_scale, span.causal)
        return cpu.span_attention_bwd(dout, q, k, v, out, lse, softmax_scale, span, q_offset, k_offset, docs, softcap)
    mask = _reference_mask(span, q, k, q_offset, k_offset, docs)
    return reference.attention_bwd(dout, q, k, v, out, lse, softmax_scale, mask=mask, softcap=softcap)


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
    def forward(ctx, q, k, v, sinks, softmax_scale, span, backend, q_offset, k_offset, docs, softcap):
        out, lse = attention_fwd(q, k, v, softmax_scale, span, backend, q_offset, k_offset, docs, softcap)
        if sinks is not None:
            out, lse = add_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.args = (softmax_scale, span, backend, q_offset, k_offset, docs, softcap)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, *ctx.args)  # exact with the sink-applied out, lse
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        return dq, dk, dv, dsinks, *[None] * 7


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
    each row its own (one call per distinct row documents). A query with no visible key
    gets ``out = 0`` and ``lse = -inf``.

    ``softcap`` > 0 (Gemma2's ``attn_logit_softcapping``): the score of query i and key j is
    ``softcap * tanh(scale * q_i·k_j / softcap)``, then masked. ``sinks [H]`` (gpt-oss; one logit per
    query head, any float dtype, may require grad): each head's softmax gets one more key with that
    logit and a zero value; ``lse`` includes it, a query with no visible key gets ``out = 0`` and
    ``lse = sink``, and ``sinks`` gets its gradient (`sinks` module)."""
    span = span_of(causal, span)
    rows = document_rows(cu_seqlens, q.shape[0])
    if rows is not None:
        kw = dict(softmax_scale=softmax_scale, backend=backend, span=span, q_offset=q_offset)
        kw.update(softcap=softcap, sinks=sinks)
        return attend_rows(attention, rows, q, k, v, with_lse=True, k_offset=k_offset, **kw)
    check_qkv(q, k, v)
    check_softcap_sinks(q, softcap, sinks)
    backend = resolve_backend(backend, q.device)
    scale = default_scale(q.shape[-1], softmax_scale)
    docs = as_documents(cu_seqlens, q.device, q_offset + q.shape[1], k_offset + k.shape[1])
    offsets = (int(q_offset), int(k_offset))
    if torch.compiler.is_compiling():  # an opaque op: the planning reads tensor values (`op` module)
        from lsts.kernels.attention.op import compiled_attention

        return compiled_attention(q, k, v, sinks, scale, span, backend, *offsets, docs, float(softcap))
    return _LocalAttention.apply(q, k, v, sinks, scale, span, backend, *offsets, docs, float(softcap))


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
