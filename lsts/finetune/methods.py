"""The fine-tuning methods, the one list of them: what each one trains and with which attention span,
as data that imports no torch, so that `lsts.finetune.config` derives its ``--finetune.method``
choices and help from it before torch is loaded. `lsts.finetune.recipes.recipe` turns an entry into
the `Recipe` object whose hooks the fine-tuning job calls.

A method with behaviour of its own (SPT: its preparation, staging, auxiliary loss and export)
names its `Recipe` subclass as ``"module:Class"``, imported only when a run uses it; adding such a
method is its own module plus one line here (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    help: str
    # A `Span` kind of size seq_len / 4: "s2" LongLoRA's shifted groups, "sf" the same plus sink
    # tokens (SinkLoRA), "window" / "block" likewise; None: the model's own attention on every layer.
    span: str | None = None
    lora: bool = True  # peft LoRA adapters; False: every weight trainable
    train_embeddings_and_norms: bool = False  # LoRA+
    recipe: str | None = None  # "module:Class", a `lsts.finetune.recipes.Recipe` subclass; None: `Recipe`


METHODS: dict[str, Method] = {
    "lora": Method("LoRA on the attention projections"),
    "longlora": Method("S2-Attn + LoRA+", span="s2", train_embeddings_and_norms=True),
    "sinklora": Method("SF-Attn + sinks + LoRA+", span="sf", train_embeddings_and_norms=True),
    "full": Method("every weight trainable", lora=False),
    "spt": Method("sparse MHA, routed FFN", recipe="lsts.finetune.spt:SPTRecipe"),
}


def method_help() -> str:
    """``lora (LoRA on ...) | longlora (...) | ...``: the help line of ``--finetune.method``."""
    return " | ".join(f"{name} ({m.help})" for name, m in METHODS.items())


__all__ = ["METHODS", "Method", "method_help"]
