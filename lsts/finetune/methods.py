"""The fine-tuning methods, the one list of them: what each one trains and with which attention span,
as data that imports no torch, so that `lsts.finetune.config` derives its ``--finetune.method``
choices and help from it before torch is loaded. `lsts.finetune.recipes` turns an entry into a
`Recipe` and prepares the model.

A method with its own preparation (SPT) names it as ``"module:function"``, imported on use and
called as ``function(model, ctx, sparse_attention)``; adding such a method is its own module plus
one line here (docs/architecture.md)."""

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
    prepare: str | None = None  # "module:function" in place of the generic preparation


METHODS: dict[str, Method] = {
    "lora": Method("LoRA on the attention projections"),
    "longlora": Method("S2-Attn + LoRA+", span="s2", train_embeddings_and_norms=True),
    "sinklora": Method("SF-Attn + sinks + LoRA+", span="sf", train_embeddings_and_norms=True),
    "full": Method("every weight trainable", lora=False),
    "spt": Method("sparse MHA, routed FFN", prepare="lsts.finetune.spt:prepare_recipe"),
}


def method_help() -> str:
    """``lora (LoRA on ...) | longlora (...) | ...``: the help line of ``--finetune.method``."""
    return " | ".join(f"{name} ({m.help})" for name, m in METHODS.items())


__all__ = ["METHODS", "Method", "method_help"]
