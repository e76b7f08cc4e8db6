"""Hugging Face decoders on lsts attention, through ``transformers.AttentionInterface``.

Importing this module registers ``"lsts"`` with transformers' attention and mask interfaces, so
``from_pretrained(..., attn_implementation="lsts")`` and ``model.set_attn_implementation("lsts")``
work. `use_lsts_attention(model, span, ctx)` switches a loaded model and gives each attention module a
user `Span` (LongLoRA S², SinkLoRA SF, ...) and an `AttentionContext` (kernels, sequence parallelism).
No modeling file is touched: any decoder that dispatches through the interface works, one that does
not gets a clear error.

**Each layer computes the model's own attention** (`model_semantics`): the arguments transformers
passes for the layer (``sliding_window``, ``softcap``, ``s_aux`` sinks, ``scaling``, ``is_causal``)
and the config (``layer_types``, ``attention_chunk_size``, ``use_bidirectional_attention``) become a
`Span`, a logit cap and sink logits. A user span composes with it where the result is the same
attention the model would run or narrower (`compose_spans`) and is a clear error otherwise. An
argument lsts does not implement is a ``ValueError`` naming it, never silently dropped.

**Batches.** Prefill and training see `segment_ids` ``[B, N]`` instead of a mask (or none): padding
and packed documents become `Documents` per row, so real tokens never see padding or another
document. Packed rows are recognised as transformers recognises them, from ``position_ids`` that
restart (``DataCollatorWithFlattening``, TRL padding-free packing; their ``cu_seq_lens_q/k`` must
agree). Decoding against a cache (dynamic, static, sliding, left-padded) gets the explicit boolean
mask transformers builds for it, which is small there (new queries × cached keys), unless it is the
plain causal mask, which the kernels apply themselves (split-K for long caches).

**Mixed precision**: under autocast q, k, v are cast to the autocast dtype as SDPA does; otherwise
to their common dtype. The kernels accumulate in float32.

**Sequence parallelism** (``ctx.mode`` ring / ulysses / hybrid): the tensors are this rank's shard;
documents come from the context only (`lsts.models.hf.sequence_parallel` sets them per batch), and a
padding mask is refused.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lsts.attention import LOCAL, AttentionContext, attention
from lsts.kernels.attention import CAUSAL, FULL, Span
from lsts.kernels.attention import attention as local_attention
from lsts.kernels.attention.split_k import split_k_attention

NAME = "lsts"
DECODE_UNIT = 4096  # keys per split-K work unit when decoding against a longer cache

# Keyword arguments a model's forward passes down that carry no attention semantics (bookkeeping
# for other layers, the loss, the cache, Mamba's packing). Anything else lsts does not implement is
# an error.
_INERT = frozenset(
    {"position_ids", "cache_position", "num_items_in_batch", "use_cache", "output_hidden_states", "return_dict",
     "layer_idx", "cache", "past_key_values", "max_length_q", "max_length_k", "output_router_logits",
     "shift_labels", "ignore_index", "seq_idx"}
)  # fmt: skip
# What the model's own attention is made of (read by `model_semantics`).
_SEMANTIC = frozenset({"sliding_window", "softcap", "s_aux", "is_causal", "cu_seq_lens_q", "cu_seq_lens_k"})


# ---------------------------------------------------------------------------------------------------
# What a layer computes


def _layer_type(module: nn.Module) -> str | None:
    config, idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    if types is None or idx is None or idx >= len(types):
        return None
    return types[idx]


def model_semantics(module: nn.Module, kwargs: dict) -> tuple[Span, float, torch.Tensor | None]:
    """``(span, softcap, sinks)`` of ``module``'s attention as the model defines it.

    ``kwargs`` are the keyword arguments transformers passed to the attention interface (besides
    the mask, dropout and scaling); unknown ones with a value raise."""
    for key, value in kwargs.items():
        if key in _INERT or key in _SEMANTIC:
            continue
        if key == "output_attentions" and not value:
            continue
        if value is not None:
            raise ValueError(
                f"lsts attention does not implement the attention argument {key!r} "
                f"({type(module).__name__}); run this model with attn_implementation='eager' or 'sdpa'"
            )
    config = getattr(module, "config", None)
    layer_type = _layer_type(module)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        causal = False
    window = kwargs.get("sliding_window")
    if window is None and layer_type == "sliding_attention":
        window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None) if layer_type == "chunked_attention" else None
    if window and chunk:
        raise ValueError(f"layer {module.layer_idx} has both a sliding window ({window}) and chunks ({chunk})")
    if not causal and (window or chunk):
        raise ValueError(
            f"lsts has no bidirectional sliding-window or chunked attention (layer {module.layer_idx} of "
            f"{type(module).__name__}); run this model with attn_implementation='eager' or 'sdpa'"
        )
    if not causal:
        span = FULL
    else:
        span = Span("window", int(window)) if window else Span("block", int(chunk)) if chunk else CAUSAL
    softcap = kwargs.get("softcap") or 0.0
    sinks = kwargs.get("s_aux")
    return span, float(softcap), sinks


def compose_spans(model: Span, user: Span | None, where: str = "") -> Span:
    """The span a layer runs when the user asks for ``user`` (None: the model's own) on a layer whose
    own attention is ``model``. Allowed where the user's span only narrows the model's (a LongLoRA
    group inside a window, a narrower window, blocks that nest in the model's chunks); a span that
    would let a query see keys the model hides, or hide keys a bidirectional layer sees, is an error."""
    if user is None or user == model:
        return model
    where = f" on {where}" if where else ""
    if model == CAUSAL:
        if user.kind == "full":
            raise ValueError(f"span 'full' would let causal layers{where} see future tokens")
        return user
    if model.kind == "window":
        if user.kind == "window":
            return Span("window", min(user.size, model.size))
        if user.kind in ("block", "s2") and user.size <= model.size:
            return user  # every group lies inside the window: the window is implied
        raise ValueError(
            f"span {user.kind}({user.size}) does not fit the model's sliding window of {model.size}{where}: "
            f"use groups of at most {model.size} tokens (sink tokens outside the window are not allowed)"
        )
    if model.kind == "block" and user.kind == "block" and model.size % user.size == 0:
        return user
    raise ValueError(f"span {user.kind}({user.size}) contradicts the model's own attention {model}{where}")


# ---------------------------------------------------------------------------------------------------
# Batches: padding and packed documents


def segment_ids(batch: int, length: int, mask_function, padding, device) -> torch.Tensor | None:
    """``[B, N]`` int32 ids of a prefill's segments: 0 for padding, 1, 2, ... for the runs of tokens
    that attend only among themselves, or None for one plain sequence per row.

    The runs are read off the mask transformers composed for the layer kind (packed documents, as
    detected from restarting ``position_ids``, and chunk boundaries): a run ends where a token may
    not see its predecessor. Inside a run the layer's own span applies, so this is exact for every
    mask made of causal, window, chunk and document predicates, at the cost of N - 1 evaluations."""
    ids = None
    if length > 1:
        i = torch.arange(1, length, device=device)[None, :]
        b = torch.arange(batch, device=device)[:, None]
        sees_previous = mask_function(b, torch.zeros_like(b), i, i - 1).expand(batch, length - 1)
        if not sees_previous.all():
            starts = torch.cat([torch.ones_like(b, dtype=torch.int32), (~sees_previous).int()], dim=1)
            ids = starts.cumsum(dim=1, dtype=torch.int32)
    if padding is not None:
        padding = padding[:, -length:].to(device=device, dtype=torch.bool)
        if not padding.all():
            ids = (torch.ones(batch, length, dtype=torch.int32, device=device) if ids is None else ids) * padding
    return ids


def row_documents(segments: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int, length: int):
    """``cu_seqlens`` per batch row of a prefill (None: one plain sequence per row): the runs of
    `segment_ids`, also cut where ``position_ids`` restart. FlashAttention packs on restarting
    positions whatever the model passes its mask; so does lsts, also for models whose mask ignores
    them (gpt-oss) and for a forward with a cache."""
    if segments is not None and tuple(segments.shape) != (batch, length):
        raise ValueError(f"lsts prefill expects [batch, seq] segment ids from its mask, got {tuple(segments.shape)}")
    cuts = torch.zeros(batch, length, dtype=torch.bool)
    if segments is not None:
        cuts[:, 1:] |= (segments[:, 1:] != segments[:, :-1]).cpu()
    if position_ids is not None and position_ids.shape[-1] == length:
        positions = position_ids.expand(batch, length)
        cuts[:, 1:] |= (positions[:, 1:] != positions[:, :-1] + 1).cpu()
    if not cuts.any():
        return None
    return [[0, *row.nonzero().flatten().tolist(), length] for row in cuts]


def _check_flash_kwargs(kwargs: dict, docs: list[list[int]] | None, length: int) -> None:
    """FlashAttention's varlen kwargs (``DataCollatorWithFlattening``) come with the restarting
    ``position_ids`` the mask was made from: they must describe the same documents."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return
    if cu_k is not None and (cu_q is None or not torch.equal(cu_k.cpu(), cu_q.cpu())):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: lsts packs self-attention documents only")
    cu = [int(c) for c in cu_q]
    found = docs[0] if docs is not None and len(docs) == 1 else [0, length]
    if cu != found:
        raise ValueError(
            f"cu_seq_lens_q {cu} disagree with the documents of the position_ids {found}: pass position_ids that "
            f"restart at every document with them (DataCollatorWithFlattening does)"
        )


def _attend_documents(q, k, v, span, ctx, scale, softcap, sinks, cu: list[int]) -> torch.Tensor:
    """One row of packed documents. Spans whose groups start at a position (chunks, S² groups) count
    positions from each document's start, as the model would on the document alone."""
    if span.group == 0:
        return attention(q, k, v, span, ctx.with_documents(cu), scale, softcap=softcap, sinks=sinks)
    parts = [
        attention(q[:, a:b], k[:, a:b], v[:, a:b], span, ctx, scale, softcap=softcap, sinks=sinks)
        for a, b in itertools.pairwise(cu)
    ]
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------------
# Decoding against a cache


def _masked_attention(q, k, v, keep, scale, softcap, sinks) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an explicit boolean mask ``keep [B, 1|H, Sq, Sk]``, materialized: the decode
    path for padded batches and static / sliding caches, where Sq is a few new tokens."""
    acc = torch.promote_types(q.dtype, torch.float32)
    h = q.shape[2]
    k, v = (x.repeat_interleave(h // x.shape[2], dim=2).to(acc) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.to(acc)[None, :, None].expand_as(lse))
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v).to(q.dtype), lse


def _decode(module, q, k, v, keep, span, ctx, scale, softcap, sinks):
    """New queries against a cache (``Sq < Sk``), an explicit mask, or an observer's prefill."""
    if ctx.mode != "local":
        raise ValueError("decoding with a KV cache runs local attention; give the model ctx=LOCAL")
    observer = getattr(module, "lsts_observer", None)
    if keep is not None and observer is not None:
        raise ValueError("an attention observer (H2O cache) needs an unpadded batch and a dynamic cache")
    if keep is not None and keep.dim() != 4:
        raise ValueError(f"decoding needs the mask lsts builds ([B, 1, Sq, Sk]), got shape {tuple(keep.shape)}")
    if keep is not None:
        return _masked_attention(q, k, v, keep, scale, softcap, sinks)[0]
    offset = k.shape[1] - q.shape[1]  # the queries are the last keys
    plain = span == CAUSAL and not softcap and sinks is None and observer is None
    if plain and not torch.is_grad_enabled() and k.shape[1] > DECODE_UNIT:
        # A long cache: equal units of keys whose partial (out, lse) merge (split-K, Lean Attention).
        n_splits = -(-k.shape[1] // DECODE_UNIT)
        return split_k_attention(q, k, v, n_splits, softmax_scale=scale, backend=ctx.backend)[0]
    out, lse = local_attention(
        q, k, v, span=span, softmax_scale=scale, q_offset=offset, backend=ctx.backend, softcap=softcap, sinks=sinks
    )
    if observer is not None:
        observer.observe(module.layer_idx, q, k, lse, scale)
    return out


# ---------------------------------------------------------------------------------------------------
# The interface entries


def _common_dtype(*xs: torch.Tensor) -> torch.dtype:
    device = xs[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


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
    """The attention-interface entry: ``query [B, H, Sq, D]``, ``key [B, H_kv, Sk, D]``,
    ``value [B, H_kv, Sk, Dv]`` -> ``([B, Sq, H, Dv], None)``.

    A module's ``lsts_observer`` (e.g. `lsts.inference.H2OCache`, which scores the keys it keeps)
    gets ``observe(layer_idx, q, k, lse, scaling)`` after each decode call, tensors in BSHD."""
    if dropout:
        raise ValueError(f"lsts attention has no dropout (got {dropout}); set the model's attention_dropout to 0")
    model_span, softcap, sinks = model_semantics(module, kwargs)
    where = f"layer {getattr(module, 'layer_idx', '?')} of {type(module).__name__}"
    span = compose_spans(model_span, getattr(module, "lsts_span", None), where)
    ctx: AttentionContext = getattr(module, "lsts_ctx", LOCAL)
    dtype = _common_dtype(query, key, value)
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    dv = v.shape[-1]
    if dv != q.shape[-1]:  # MLA: zero columns change neither the scores nor the kept output columns
        width = max(dv, q.shape[-1])
        q, k, v = (nn.functional.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))

    explicit = attention_mask is not None and attention_mask.dim() == 4
    if explicit or q.shape[1] != k.shape[1] or getattr(module, "lsts_observer", None) is not None:
        out = _decode(module, q, k, v, attention_mask, span, ctx, scale, softcap, sinks)
    elif ctx.mode != "local" or ctx.documents is not None or not ctx.infer_documents:
        # The context holds the documents (sequence parallelism, the lsts trainers): the mask's runs
        # only restate them, or are the jumps of a shard's global positions; padding is not allowed.
        if attention_mask is not None and not attention_mask.all():
            raise ValueError(
                "a padded batch where the attention context sets the documents (sequence parallelism or an lsts "
                "trainer): pack the rows instead (lsts.models.hf.sequence_parallel does)"
            )
        if kwargs.get("cu_seq_lens_q") is not None:
            raise ValueError("cu_seq_lens_q where the attention context sets the documents: drop it from the inputs")
        out = attention(q, k, v, span, ctx, scale, softcap=softcap, sinks=sinks)
    else:
        docs = row_documents(attention_mask, kwargs.get("position_ids"), q.shape[0], q.shape[1])
        _check_flash_kwargs(kwargs, docs, q.shape[1])
        if docs is None:
            out = attention(q, k, v, span, ctx, scale, softcap=softcap, sinks=sinks)
        else:
            rows = [slice(i, i + 1) for i in range(q.shape[0])]
            out = torch.cat(
                [_attend_documents(q[r], k[r], v[r], span, ctx, scale, softcap, sinks, cu) for r, cu in zip(rows, docs)]
            )
    return out[..., :dv], None


def lsts_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask-interface entry. A prefill without a cache gets `segment_ids` (or None): the model's
    own span and the documents cover the rest at O(N) cost. Against a cache,
    the explicit boolean mask ``[B, 1, Sq, Sk]`` transformers defines (small there), or None when it
    is the plain causal mask of queries at the end of the keys."""
    q_offset = int(q_offset)
    if q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return segment_ids(batch_size, q_length, mask_function, attention_mask, kwargs.get("device", "cpu"))
    for key in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(key, None)
    keep = sdpa_mask(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
        allow_is_causal_skip=False, **kwargs,
    )  # fmt: skip
    if kv_offset == 0:  # the queries are the last keys and see every key before them: the kernels' causal
        plain = torch.ones(q_length, kv_length, dtype=torch.bool, device=keep.device).tril(kv_length - q_length)
        if torch.equal(keep, plain.expand_as(keep)):
            return None
    return keep


def register() -> None:
    """Make ``attn_implementation="lsts"`` available to every transformers model (idempotent)."""
    AttentionInterface.register(NAME, lsts_attention_forward)
    AttentionMaskInterface.register(NAME, lsts_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call the attention interface: they carry the layer index transformers uses."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]


def use_lsts_attention(
    model: nn.Module, span: Span | list[Span | None] | None = None, ctx: AttentionContext = LOCAL
) -> nn.Module:
    """Run ``model``'s attention on lsts with ``ctx``, each layer as the model defines it, narrowed
    by ``span`` where given (one for all layers, or one per layer; None: the model's own); returns
    the model. ValueError for a model that cannot take the attention interface."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not dispatch its attention through transformers.AttentionInterface, "
            f"so lsts attention cannot plug in; use a model that does (Llama, Mistral, Qwen2, ...)"
        )
    model.set_attn_implementation(NAME)
    modules = attention_modules(model)
    spans = span if isinstance(span, list) else [span] * len(modules)
    if len(spans) != len(modules):
        raise ValueError(f"{len(spans)} spans for {len(modules)} attention layers")
    for module, s in zip(modules, spans):
        module.lsts_span, module.lsts_ctx = s, ctx
    return model


register()

__all__ = [
    "NAME",
    "attention_modules",
    "compose_spans",
    "lsts_attention_forward",
    "lsts_mask",
    "model_semantics",
    "register",
    "use_lsts_attention",
]
