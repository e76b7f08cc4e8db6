"""Long-context fine-tuning recipes for Hugging Face decoders (``docs/algorithms.md`` §6-§7).

- ``lora``: LoRA (peft; r=8, alpha=16 on the attention projections, `lsts.finetune.targets`) with
  full causal attention.
- ``longlora``: LongLoRA — S²-Attn (shifted groups of a quarter of the length, leak-free) for
  training, LoRA+ (embeddings and every norm trainable besides the adapters).
- ``sinklora``: SinkLoRA — SF-Attn (the same groups plus 4 global sink tokens), LoRA+.
- ``full``: every weight trainable, full causal attention.
- ``spt``: SPT (`lsts.finetune.spt`): sparse MHA by product-quantized key selection, routed FFN,
  LoRA r=16 on attention and FFN projections.

All extend the positions by linear interpolation (`lsts.finetune.positions`): RoPE's factor is
``ceil(target / original)``, written into the config with every other RoPE setting kept, so the
merged checkpoint runs at the new length in plain transformers. Evaluation and generation use the
model's own attention (no training span). The base model's own attention settings (sliding window, softcapping,
sinks, layer types) stay in its config: trained with and exported as they are.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lsts.attention import LOCAL, AttentionContext, RolledS2
from lsts.finetune.methods import METHODS
from lsts.finetune.positions import extend_positions, interpolation_factor
from lsts.finetune.targets import lora_config
from lsts.kernels.attention import Span
from lsts.models.hf import use_lsts_attention

N_SINK = 4


@dataclass(frozen=True)
class Recipe:
    method: str
    span: Span | RolledS2 | None  # None: the model's own attention on every layer
    lora: bool
    train_embeddings_and_norms: bool  # LoRA+


def recipe(method: str, seq_len: int, s2_variant: str = "leak_free") -> Recipe:
    """The recipe of ``method`` at training length ``seq_len`` (groups of seq_len / 4, as LongLoRA);
    ``s2_variant="roll"`` gives longlora the paper's rolled grouping (an ablation, `RolledS2`)."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {tuple(METHODS)}")
    m, group = METHODS[method], seq_len // 4
    if m.span in ("s2", "sf") and (group < 2 or group % 2):
        raise ValueError(
            f"{method} shifts groups of seq_len / 4 = {group} tokens by half: seq_len must be a multiple of 8"
        )
    if s2_variant not in ("leak_free", "roll"):
        raise ValueError(f"unknown S² variant {s2_variant!r}; choose leak_free or roll")
    span = None
    if m.span == "s2":
        span = RolledS2(group) if s2_variant == "roll" else Span("s2", group)
    elif m.span is not None:
        span = Span(m.span, group, N_SINK if m.span == "sf" else 0)
    return Recipe(method, span, m.lora, m.train_embeddings_and_norms)


def load_extended(model_dir: str | Path, seq_len: int, dtype: torch.dtype = torch.float32):
    """The checkpoint with linear RoPE interpolation for ``seq_len`` written into its config
    (`extend_positions`)."""
    config = AutoConfig.from_pretrained(model_dir)
    extend_positions(config, seq_len)
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
    if METHODS[method].prepare is not None:  # the method's own preparation, from its own module
        module, function = METHODS[method].prepare.split(":")
        return getattr(importlib.import_module(module), function)(model, ctx, sparse_attention)
    use_lsts_attention(model, span=rec.span, ctx=ctx)
    if not rec.lora:
        return model.requires_grad_(True)
    model = get_peft_model(model, lora_config(model, r, alpha))
    if rec.train_embeddings_and_norms:
        for module in (model.get_input_embeddings(), *filter(_is_norm, model.modules())):
            module.requires_grad_(True)
    return model


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the models' own norm classes (``LlamaRMSNorm``, ``Gemma2RMSNorm``...)."""
    return "Norm" in type(module).__name__


def export_merged(model, out_dir: str | Path) -> Path:
    """LoRA merged into the weights, saved with `save_pretrained` for plain transformers (the RoPE
    factor travels in the config); returns ``out_dir/merged``. Its files get the permissions of any
    file the user creates (``0666 & ~umask``): safetensors may write them owner-only."""
    path = Path(out_dir) / "merged"
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    if any(hasattr(m, "spt_pq") for m in merged.modules()):
        from lsts.finetune.spt import strip_spt

        strip_spt(merged)  # plain transformers runs the dense FFN and attention of the merged weights
    merged.config._attn_implementation = "sdpa"  # a plain load must not need lsts registered
    merged.save_pretrained(path)
    _normal_permissions(path)
    return path


def _normal_permissions(directory: Path) -> None:
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    for file in directory.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


__all__ = [
    "METHODS",
    "Recipe",
    "export_merged",
    "interpolation_factor",
    "load_extended",
    "prepare",
    "recipe",
]
