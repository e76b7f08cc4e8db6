"""Hugging Face decoders on lsts attention, through ``transformers.AttentionInterface``.

`use_lsts_attention(model, span, ctx)` registers the ``"lsts"`` attention implementation (and, for
its masks, the FlashAttention-style 2-D padding mask of ``AttentionMaskInterface``), switches the
model to it and gives each attention module its `Span` and `AttentionContext`. No modeling file is
touched: any decoder that dispatches through the attention interface works, and one that does not
gets a clear error.

Padding: the 2-D mask of a padded batch becomes packed documents per row (the padding is a
document of its own, so real tokens never see it), each row attended on its own.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from lsts.attention import LOCAL, AttentionContext, attention
from lsts.inference.decode import split_k_attention
from lsts.kernels.attention import CAUSAL, Span
from lsts.kernels.attention import attention as local_attention

NAME = "lsts"
DECODE_UNIT = 4096  # keys per split-K work unit when decoding against a longer cache


def _runs(valid: torch.Tensor) -> list[int]:
    """``cu_seqlens`` of the runs of equal values in a row's 0/1 padding mask."""
    change = (valid[1:] != valid[:-1]).nonzero().flatten() + 1
    return [0, *change.tolist(), valid.numel()]


def lsts_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention-interface entry: ``query [B, H, Sq, D]``, ``key, value [B, H_kv, Sk, D]`` ->
    ``([B, Sq, H, D], None)``.

    A module's ``lsts_observer`` (e.g. `lsts.inference.H2OCache`, which scores the keys it keeps)
    gets ``observe(layer_idx, q, k, lse, scaling)`` after each call, tensors in BSHD."""
    if dropout:
        raise ValueError(f"lsts attention has no dropout (got {dropout}); set the model's attention_dropout to 0")
    span, ctx = getattr(module, "lsts_span", CAUSAL), getattr(module, "lsts_ctx", LOCAL)
    observer = getattr(module, "lsts_observer", None)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if q.shape[1] != k.shape[1] or observer is not None:  # against a cache: the queries are the last keys
        if ctx.mode != "local":
            raise ValueError("decoding with a KV cache runs local attention; give the model ctx=LOCAL")
        if observer is not None and attention_mask is not None:
            raise ValueError("an attention observer (H2O cache) needs an unpadded batch; got a padding mask")
        offset = k.shape[1] - q.shape[1]
        if span == CAUSAL and observer is None and not torch.is_grad_enabled() and k.shape[1] > DECODE_UNIT:
            # A long cache: equal units of keys whose partial (out, lse) merge (split-K, Lean Attention).
            n_splits = -(-k.shape[1] // DECODE_UNIT)
            return split_k_attention(q, k, v, n_splits, softmax_scale=scaling, backend=ctx.backend)[0], None
        out, lse = local_attention(q, k, v, span=span, softmax_scale=scaling, q_offset=offset, backend=ctx.backend)
        if observer is not None:
            observer.observe(module.layer_idx, q, k, lse, scaling)
        return out, None
    if attention_mask is None:
        return attention(q, k, v, span, ctx, softmax_scale=scaling), None
    if ctx.mode != "local":
        raise ValueError("padded batches run local attention; pack sequences (cu_seqlens) under sequence parallelism")
    rows = [
        attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], span, ctx.with_documents(_runs(attention_mask[i])), scaling)
        for i in range(q.shape[0])
    ]
    return torch.cat(rows), None


def register() -> None:
    """Make ``attn_implementation="lsts"`` available to every transformers model (idempotent)."""
    AttentionInterface.register(NAME, lsts_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call the attention interface: they carry the layer index transformers uses."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]


def use_lsts_attention(model: nn.Module, span: Span | list[Span] = CAUSAL, ctx: AttentionContext = LOCAL) -> nn.Module:
    """Run ``model``'s attention on lsts with ``span`` (one for all layers, or one per layer) and
    ``ctx``; returns the model. ValueError for a model that cannot take the attention interface."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not dispatch its attention through transformers.AttentionInterface, "
            f"so lsts attention cannot plug in; use a model that does (Llama, Mistral, Qwen2, ...)"
        )
    register()
    model.set_attn_implementation(NAME)
    modules = attention_modules(model)
    spans = span if isinstance(span, list) else [span] * len(modules)
    if len(spans) != len(modules):
        raise ValueError(f"{len(spans)} spans for {len(modules)} attention layers")
    for module, s in zip(modules, spans):
        module.lsts_span, module.lsts_ctx = s, ctx
    return model


__all__ = ["NAME", "attention_modules", "lsts_attention_forward", "register", "use_lsts_attention"]
