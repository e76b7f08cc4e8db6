"""Long-context fine-tuning recipes for Hugging Face decoders (``ALGORITHMS.md`` §6-§7).

- ``lora``: LoRA (peft; r=8, alpha=16 on q/k/v/o) with full causal attention.
- ``longlora``: LongLoRA — S²-Attn (shifted groups of a quarter of the length, leak-free) for
  training, LoRA+ (embeddings and every norm trainable besides the adapters).
- ``sinklora``: SinkLoRA — SF-Attn (the same groups plus 4 global sink tokens), LoRA+.
- ``full``: every weight trainable, full causal attention.
- ``spt``: SPT (`lsts.finetune.spt`): sparse MHA by product-quantized key selection, routed FFN,
  LoRA r=16 on attention and FFN projections.

All extend the positions by linear interpolation: RoPE's factor is ``ceil(target / original)``, and
the factor is written into the config, so the merged checkpoint runs at the new length in plain
transformers. Evaluation and generation use full attention (`for_evaluation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from lsts.attention import LOCAL, AttentionContext, RolledS2
from lsts.kernels.attention import CAUSAL, Span
from lsts.models.hf import attention_modules, use_lsts_attention

METHODS = ("lora", "longlora", "sinklora", "full", "spt")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
N_SINK = 4


@dataclass(frozen=True)
class Recipe:
    method: str
    span: Span | RolledS2
    lora: bool
    train_embeddings_and_norms: bool  # LoRA+


def recipe(method: str, seq_len: int, s2_variant: str = "leak_free") -> Recipe:
    """The recipe of ``method`` at training length ``seq_len`` (groups of seq_len / 4, as LongLoRA);
    ``s2_variant="roll"`` gives longlora the paper's rolled grouping (an ablation, `RolledS2`)."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {METHODS}")
    group = seq_len // 4
    if method in ("longlora", "sinklora") and (group < 2 or group % 2):
        raise ValueError(
            f"{method} shifts groups of seq_len / 4 = {group} tokens by half: seq_len must be a multiple of 8"
        )
    if s2_variant not in ("leak_free", "roll"):
        raise ValueError(f"unknown S² variant {s2_variant!r}; choose leak_free or roll")
    s2 = RolledS2(group) if s2_variant == "roll" else Span("s2", group)
    span = {"longlora": s2, "sinklora": Span("sf", group, N_SINK)}.get(method, CAUSAL)
    return Recipe(method, span, lora=method != "full", train_embeddings_and_norms=method in ("longlora", "sinklora"))


def interpolation_factor(seq_len: int, original: int) -> int:
    """Position interpolation: ``ceil(target / original)``, at least 1."""
    return max(1, math.ceil(seq_len / original))


def load_extended(model_dir: str | Path, seq_len: int, dtype: torch.dtype = torch.float32):
    """The checkpoint with linear RoPE interpolation for ``seq_len`` written into its config."""
    config = AutoConfig.from_pretrained(model_dir)
    factor = interpolation_factor(seq_len, config.max_position_embeddings)
    if factor > 1:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 1e4))
        config.rope_parameters = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
        config.max_position_embeddings = seq_len
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)


def prepare(
    model,
    method: str,
    seq_len: int,
    ctx: AttentionContext = LOCAL,
    r: int = 8,
    alpha: int = 16,
    s2_variant: str = "leak_free",
    sparse_attention: bool = True,
):
    """Put ``model`` on lsts attention with the recipe's span and make the recipe's weights
    trainable (peft adapters for the LoRA methods). Returns the model to train. ``spt`` keeps its
    own LoRA rank (16) and needs ``sparse_attention`` false under context parallelism."""
    rec = recipe(method, seq_len, s2_variant)
    if method == "spt":
        from lsts.finetune.spt import SPTConfig, prepare_spt

        return prepare_spt(model, SPTConfig(sparse_attention=sparse_attention, backend=ctx.backend), ctx)
    use_lsts_attention(model, span=rec.span, ctx=ctx)
    if not rec.lora:
        return model.requires_grad_(True)
    model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    )
    if rec.train_embeddings_and_norms:
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "norm" in name:
                p.requires_grad_(True)
    return model


def for_evaluation(model, ctx: AttentionContext = LOCAL):
    """Full causal attention on every layer (the spans are a training device)."""
    for module in attention_modules(model):
        module.lsts_span, module.lsts_ctx = CAUSAL, ctx
    return model


def export_merged(model, out_dir: str | Path) -> Path:
    """LoRA merged into the weights, saved with `save_pretrained` for plain transformers (the RoPE
    factor travels in the config); returns ``out_dir/merged``."""
    path = Path(out_dir) / "merged"
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    if any(hasattr(m, "spt_pq") for m in merged.modules()):
        from lsts.finetune.spt import strip_spt

        strip_spt(merged)  # plain transformers runs the dense FFN and attention of the merged weights
    merged.config._attn_implementation = "sdpa"  # a plain load must not need lsts registered
    merged.save_pretrained(path)
    return path


__all__ = [
    "METHODS",
    "Recipe",
    "export_merged",
    "for_evaluation",
    "interpolation_factor",
    "load_extended",
    "prepare",
    "recipe",
]
