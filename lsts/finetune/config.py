"""The configuration of ``launch/finetune.py``: the training sections of `lsts.config` (parallel,
kernels, data, optim, train, checkpoint, metrics) plus a ``finetune`` section in place of ``model``
(the model is a Hugging Face checkpoint). Defaults follow the LongLoRA recipe: lr 2e-5, no weight
decay, constant schedule after 20 warmup steps, LoRA r=8 / alpha=16 on the attention projections.
"""

# ruff: noqa: RUF009  # `_f` is `dataclasses.field` with help metadata: its result is not a shared default

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lsts.config import (
    CheckpointConfig,
    DataConfig,
    InvalidConfig,
    KernelsConfig,
    MetricsConfig,
    OptimConfig,
    ParallelConfig,
    Sections,
    TrainConfig,
    _at_least,
    _f,
)
from lsts.finetune.methods import METHODS, method_help

Method = Literal[tuple(METHODS)]


@dataclass
class FinetuneConfig:
    """What is fine-tuned, and how."""

    model: str = _f("", "Hugging Face checkpoint: a local directory or a hub name already in the local cache")
    method: Method = _f("longlora", method_help())
    lora_r: int = _f(8, "LoRA rank of lora / longlora / sinklora (spt uses SPT's 16)")
    lora_alpha: int = _f(16, "LoRA alpha of lora / longlora / sinklora (spt uses 32)")
    s2_variant: Literal["leak_free", "roll"] = _f(
        "leak_free", "S2-Attn grouping: leak_free (default) or the paper's roll, an ablation (one device only)"
    )
    spt_dense_steps: int = _f(20, "spt: steps of dense attention while the codebooks train, then sparse attention")
    merged: bool = _f(True, "write out/merged: LoRA merged, RoPE factor in the config, save_pretrained")


@dataclass
class FinetuneRunConfig(Sections):
    """A fine-tuning run of a Hugging Face decoder. Build with `load_finetune_config`."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(tokenizer="auto", seq_len=8192))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, min_lr=0.0, weight_decay=0.0, warmup_steps=20, schedule="constant")
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/finetune"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self, world_size: int | None = None) -> None:
        """`InvalidConfig` listing every bad value and its fix (see `lsts.config.Sections.validate`)."""
        f = self.finetune
        errors = self.world_errors(world_size)
        errors += [] if f.model else ["finetune.model is empty; give --model <local HF directory or hub name>"]
        errors += _at_least("finetune", f, 1, "lora_r", "lora_alpha") + _at_least("finetune", f, 0, "spt_dense_steps")
        errors += self.common_errors()
        if f.s2_variant == "roll" and METHODS[f.method].span != "s2":
            errors.append(f"finetune.s2_variant=roll is a LongLoRA ablation; method {f.method!r} has no S2 groups")
        if errors:
            raise InvalidConfig(errors)


SHORTHANDS = {
    "--model": "finetune.model",
    "--method": "finetune.method",
    "--seq-len": "data.seq_len",
    "--steps": "train.steps",
    "--out": "train.out",
    "--seed": "train.seed",
    "--data": "data.dataset",
}


def load_finetune_config(argv: list[str] | None = None, world_size: int | None = None) -> FinetuneRunConfig:
    """Defaults < ``--config`` < command line, validated (`lsts.config.load_config`)."""
    from lsts.config import load_config

    description = "lsts: long-context fine-tuning of Hugging Face decoders"
    return load_config(argv, FinetuneRunConfig, SHORTHANDS, description, world_size)


__all__ = ["SHORTHANDS", "FinetuneConfig", "FinetuneRunConfig", "load_finetune_config"]
