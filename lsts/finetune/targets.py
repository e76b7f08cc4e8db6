"""Where LoRA goes in a Hugging Face decoder, found from the model's own modules (no name lists).

The attention modules are those that call ``transformers.AttentionInterface``
(`lsts.models.hf.attention_modules`); every linear layer inside one is a target, whatever the
architecture calls it: ``q_proj``/``k_proj``/``v_proj``/``o_proj``, Phi3's fused ``qkv_proj``,
GPT-NeoX's ``query_key_value``/``dense``, DeepSeek's ``q_a_proj``..., GPT-2's ``c_attn``/``c_proj``
(transformers' ``Conv1D``, weights stored transposed: peft's ``fan_in_fan_out``). `lora_targets` is
the list every LoRA recipe adapts; a recipe that adapts more extends it, as SPT adds `mlp_targets`
(the linear layers of each decoder layer outside its attention: the feed-forward projections).
The names are qualified, so a layer elsewhere with the same leaf name is never caught.
"""

from __future__ import annotations

from peft import LoraConfig
from torch import nn
from transformers.pytorch_utils import Conv1D

from lsts.models.hf import attention_modules

LORA_LAYERS = (nn.Linear, Conv1D)  # the layer types peft adapts that a decoder's projections use


def _linears(module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{prefix}.{name}" if prefix else name
        for name, child in module.named_modules()
        if name and isinstance(child, LORA_LAYERS) and not any(name == s or name.startswith(s + ".") for s in skip)
    ]


def lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of the layers LoRA adapts: each attention module's linear layers. ValueError
    for a model whose attention has no linear layer."""
    names = {module: name for name, module in model.named_modules()}
    attention = attention_modules(model)
    targets = [t for module in attention for t in _linears(module, names[module])]
    if not targets:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"model type {model_type!r}: found no linear layers inside attention modules "
            f"({len(attention)} modules with layer_idx and scaling), so LoRA has nothing to adapt; "
            "use a decoder that runs its attention through transformers.AttentionInterface, or method=full"
        )
    return targets


def mlp_targets(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers of the decoder layers outside their attention (the
    feed-forward projections), for a recipe that adapts them besides `lora_targets`."""
    names = {module: name for name, module in model.named_modules()}
    attention = attention_modules(model)
    targets = []
    # A decoder layer is an attention module's parent; its attention's linears are lora_targets'.
    for layer_name in dict.fromkeys(names[m].rpartition(".")[0] for m in attention):
        if not layer_name:
            raise ValueError("the attention module is the model itself: there is no decoder layer to find MLPs in")
        inside = tuple(names[m].removeprefix(layer_name + ".") for m in attention)
        targets += _linears(model.get_submodule(layer_name), layer_name, skip=inside)
    return targets


def lora_config(model: nn.Module, targets: list[str], r: int, alpha: int) -> LoraConfig:
    """The peft config adapting ``targets`` of ``model`` (rank ``r``, ``alpha``, no dropout).
    ``Conv1D`` targets (GPT-2) take ``fan_in_fan_out``; peft has one such flag per config, so a
    model mixing Conv1D and Linear targets is a ValueError."""
    conv1d = {isinstance(model.get_submodule(t), Conv1D) for t in targets}
    if len(conv1d) > 1:
        raise ValueError(
            f"model type {model.config.model_type!r} mixes Conv1D and Linear LoRA targets, which one peft config "
            "cannot adapt (fan_in_fan_out is per config); use method=full"
        )
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=conv1d.pop())


__all__ = ["LORA_LAYERS", "lora_config", "lora_targets", "mlp_targets"]
