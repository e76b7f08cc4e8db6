"""Long-context fine-tuning recipes for Hugging Face decoders (``docs/algorithms.md`` §6-§7).

A fine-tuning method is a `Recipe`: an object whose hooks the fine-tuning job calls
(`lsts.finetune.trainer.FinetuneJob`), which knows no method by name:

- ``prepare(model, ctx, cp) -> model``: put the loaded model on lsts attention and make the
  method's weights trainable; ``cp`` is the context-parallel degree the model will train under;
- ``before_step(model, step)``: training-time changes at the start of ``step`` (also on resume);
- ``aux_loss(model) -> Tensor | None``: a loss added, per token, to the language-model loss of each
  training forward (None: none);
- ``export(model, out_dir) -> Path``: write ``out_dir/merged`` for plain transformers.

`recipe(method, seq_len, settings)` builds the one of ``METHODS[method]`` (`lsts.finetune.methods`):
this module's `Recipe` for the methods that are a span and a choice of trainable weights, or the
subclass the entry names.

- ``lora``: LoRA (peft; r=8, alpha=16 on the attention projections, `lsts.finetune.targets`) with
  full causal attention.
- ``longlora``: LongLoRA — S²-Attn (shifted groups of a quarter of the length, leak-free) for
  training, LoRA+ (embeddings and every norm trainable besides the adapters).
- ``sinklora``: SinkLoRA — SF-Attn (the same groups plus 4 global sink tokens), LoRA+.
- ``full``: every weight trainable, full causal attention.
- ``spt``: SPT (`lsts.finetune.spt.SPTRecipe`): sparse MHA by product-quantized key selection,
  routed FFN, LoRA r=16 on attention and FFN projections.

All extend the positions by linear interpolation (`lsts.finetune.positions`): RoPE's factor is
``ceil(target / original)``, written into the config with every other RoPE setting kept, so the
merged checkpoint runs at the new length in plain transformers. Evaluation and generation use the
model's own attention (no training span). The base model's own attention settings (sliding window, softcapping,
sinks, layer types) stay in its config: trained with and exported as they are.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lsts.attention import LOCAL, AttentionContext, RolledS2
from lsts.finetune.config import FinetuneConfig
from lsts.finetune.methods import METHODS
from lsts.finetune.positions import extend_positions, interpolation_factor
from lsts.finetune.targets import lora_config, lora_targets
from lsts.kernels.attention import Span
from lsts.models.hf import use_lsts_attention

N_SINK = 4


class Recipe:
    """A fine-tuning method as the hooks the job calls; this class is the recipe of the methods that
    are a span of size ``seq_len / 4`` (groups of it, as LongLoRA) and a choice of trainable weights
    (``METHODS[name]``). ``settings`` gives ``lora_r``, ``lora_alpha`` and ``s2_variant``
    (``"roll"``: longlora's rolled grouping, an ablation, `RolledS2`); a subclass reads its own.
    Use `recipe` to build one."""

    def __init__(self, settings: FinetuneConfig, seq_len: int) -> None:
        method, group = METHODS[settings.method], seq_len // 4
        if method.span in ("s2", "sf") and (group < 2 or group % 2):
            raise ValueError(
                f"{settings.method} shifts groups of seq_len / 4 = {group} tokens by half: "
                "seq_len must be a multiple of 8"
            )
        if settings.s2_variant not in ("leak_free", "roll"):
            raise ValueError(f"unknown S² variant {settings.s2_variant!r}; choose leak_free or roll")
        self.settings, self.seq_len = settings, seq_len
        self.span: Span | RolledS2 | None = None  # None: the model's own attention on every layer
        if method.span == "s2":
            self.span = RolledS2(group) if settings.s2_variant == "roll" else Span("s2", group)
        elif method.span is not None:
            self.span = Span(method.span, group, N_SINK if method.span == "sf" else 0)
        self.lora, self.train_embeddings_and_norms = method.lora, method.train_embeddings_and_norms

    @property
    def name(self) -> str:
        return self.settings.method

    def prepare(self, model: nn.Module, ctx: AttentionContext = LOCAL, cp: int = 1) -> nn.Module:
        """``model`` on lsts attention with the recipe's span, the recipe's weights trainable (peft
        adapters on `lora_targets` for the LoRA methods): the model to train."""
        use_lsts_attention(model, span=self.span, ctx=ctx)
        if not self.lora:
            return model.requires_grad_(True)
        targets = lora_targets(model)
        model = get_peft_model(model, lora_config(model, targets, self.settings.lora_r, self.settings.lora_alpha))
        if self.train_embeddings_and_norms:
            for module in (model.get_input_embeddings(), *filter(_is_norm, model.modules())):
                module.requires_grad_(True)
        return model

    def before_step(self, model: nn.Module, step: int) -> None:
        """Nothing changes during training."""

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        """No auxiliary loss."""
        return None

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        """LoRA merged into the weights, saved for plain transformers (`save_plain`)."""
        return save_plain(merged(model), out_dir)


def recipe(method: str, seq_len: int, settings: FinetuneConfig | None = None) -> Recipe:
    """The recipe of ``method`` at training length ``seq_len``: `Recipe`, or the subclass that
    ``METHODS[method].recipe`` names (imported now). ``settings`` (default: `FinetuneConfig`'s) gives
    the recipe's options; its ``method`` is set to ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {tuple(METHODS)}")
    cls = Recipe
    if METHODS[method].recipe is not None:
        module, name = METHODS[method].recipe.split(":")
        cls = getattr(importlib.import_module(module), name)
    return cls(replace(settings or FinetuneConfig(), method=method), seq_len)


def load_extended(model_dir: str | Path, seq_len: int, dtype: torch.dtype = torch.float32):
    """The checkpoint with linear RoPE interpolation for ``seq_len`` written into its config
    (`extend_positions`)."""
    config = AutoConfig.from_pretrained(model_dir)
    extend_positions(config, seq_len)
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the models' own norm classes (``LlamaRMSNorm``, ``Gemma2RMSNorm``...)."""
    return "Norm" in type(module).__name__


def merged(model: nn.Module) -> nn.Module:
    """``model`` with its peft LoRA merged into the weights (``merge_and_unload``); as is without."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_plain(model: nn.Module, out_dir: str | Path) -> Path:
    """Save a transformers model (adapters merged) with `save_pretrained` for plain transformers
    (the RoPE factor travels in the config); returns ``out_dir/merged``. Its files get the
    permissions of any file the user creates (``0666 & ~umask``): safetensors may write them owner-only."""
    path = Path(out_dir) / "merged"
    model.config._attn_implementation = "sdpa"  # a plain load must not need lsts registered
    model.save_pretrained(path)
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
    "interpolation_factor",
    "load_extended",
    "merged",
    "recipe",
    "save_plain",
]
