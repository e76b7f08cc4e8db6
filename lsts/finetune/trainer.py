"""The job behind ``launch/finetune.py``: a Hugging Face decoder, a recipe (`recipes`: the job calls
its hooks and knows no method by name), and the training loop of `lsts.train.trainer` (config,
data, checkpoints, metrics, non-finite guard).

The model stays a plain transformers model: lsts attention comes in through
``transformers.AttentionInterface`` (`lsts.models.hf`), LoRA through peft. `CausalLMLoss` puts
the decoder and the chunked loss head in one module, so every engine sees each parameter used
inside its forward: FSDP2 unshards the embedding and the output head for it, ZeRO-3 gathers them.
Frozen base weights are sharded like trainable ones (FSDP2, ZeRO-2/3); the optimizer holds only
the trainable ones.

At the end, ``out/merged`` gets the model with LoRA merged and the RoPE factor in its config: the
full weights are gathered to rank 0 (`full_state_dict`), loaded into a fresh copy of the recipe's
model there and saved by the recipe's ``export``, next to the tokenizer the run used (if not bytes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoTokenizer

from lsts.attention import AttentionContext
from lsts.finetune.base import load_base_config
from lsts.finetune.config import FinetuneRunConfig
from lsts.finetune.recipes import Recipe, load_extended, recipe
from lsts.kernels.loss import linear_cross_entropy
from lsts.models.hf import attention_modules
from lsts.parallel.data_parallel import apply_data_parallel
from lsts.parallel.dims import ParallelDims
from lsts.parallel.memory import tile_tokens
from lsts.train import zero
from lsts.train.data import IGNORE_INDEX
from lsts.train.engine import Update, build_update, check_engine

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config keys of output heads that transform the logits after the output embedding (Gemma's final
# softcapping, Cohere's and Granite's scales), with the value that leaves them unchanged.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


class CausalLMLoss(nn.Module):
    """A causal LM and its loss head as one module: ``forward(tokens, positions, ctx, labels)`` ->
    the summed next-token loss of a row, through `linear_cross_entropy` on the decoder's last hidden
    states and the output embedding, so ``[tokens, vocab]`` logits never exist whole. ``ctx`` (the
    row's `AttentionContext`, with its packed documents) goes to every attention module. While
    training, the ``recipe``'s auxiliary loss (SPT's codebook loss), if any, is added per token (so
    the logged loss includes it)."""

    def __init__(
        self, model: nn.Module, chunk_size: int = 4096, backend: str = "auto", recipe: Recipe | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_size, self.backend, self.recipe = chunk_size, backend, recipe
        self._attention = attention_modules(model)  # a plain list: not registered twice

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` (under peft's wrapper, if any)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def hidden_states(self, tokens, positions, ctx: AttentionContext) -> torch.Tensor:
        """The decoder's last hidden states ``[B, S, d]`` of ``tokens`` attended under ``ctx``."""
        ctx = replace(ctx, infer_documents=False)  # the row's documents are in ctx (or deliberately none)
        for module in self._attention:
            module.lsts_ctx = ctx
        decoder = self.causal_lm.get_decoder()
        return decoder(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state

    def forward(self, tokens, positions, ctx: AttentionContext, labels) -> torch.Tensor:
        hidden = self.hidden_states(tokens, positions, ctx)
        loss, _ = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            self.causal_lm.get_output_embeddings().weight.to(hidden.dtype),
            labels.reshape(-1),
            reduction="sum",
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        aux = self.recipe.aux_loss(self.model) if self.recipe is not None and self.training else None
        if aux is not None:  # a mean: weighted by the row's tokens like the rest
            loss = loss + aux * (labels != IGNORE_INDEX).sum()
        return loss


def resolve_tokenizer(name: str, model: str) -> str:
    """Tokenizer ``auto``: the checkpoint's own when it has one (a hub name is assumed to), else
    bytes; any other name as given."""
    if name != "auto":
        return name
    path = Path(model)
    has_own = not path.is_dir() or any((path / f).exists() for f in TOKENIZER_FILES)
    return model if has_own else "byte"


class FinetuneJob:
    """The fine-tuning job (a `lsts.train.engine.Job`) for `lsts.train.trainer.train`.
    Checkpoints hold the trained parameters only: the frozen base is rebuilt from ``finetune.model``
    on resume (the source path is recorded and checked)."""

    save_frozen = False

    def __init__(self, cfg: FinetuneRunConfig) -> None:
        self.cfg = cfg
        self.hf_config = load_base_config(cfg.finetune.model)  # refuses what lsts cannot run before any weight
        self.vocab_size = self.hf_config.vocab_size
        for key, neutral in LOGIT_TRANSFORMS.items():
            if getattr(self.hf_config, key, neutral) != neutral:
                raise ValueError(
                    f"{cfg.finetune.model}: {key} = {getattr(self.hf_config, key)}, which the fine-tuning loss head "
                    f"(output embedding, then cross-entropy) does not apply; set it to {neutral} in its config.json"
                )
        cfg.data.tokenizer = resolve_tokenizer(cfg.data.tokenizer, cfg.finetune.model)
        if cfg.data.tokenizer == "byte" and self.vocab_size < 256:
            raise ValueError(
                f"{cfg.finetune.model} has a vocabulary of {self.vocab_size} ids and no tokenizer files, and the byte "
                "tokenizer needs 256; save the model's tokenizer next to it or pass --data.tokenizer=<path>"
            )
        self.recipe = recipe(cfg.finetune.method, cfg.data.seq_len, cfg.finetune)
        self.model: CausalLMLoss | None = None
        # Resuming loads the trained parameters over a base built from this source: it must be the same one.
        source = cfg.finetune.model
        self.checkpoint_extra = {"base": os.path.abspath(source) if os.path.isdir(source) else source}
        self.checkpoint_extra["method"] = cfg.finetune.method
        self.cp = 1  # the context-parallel degree the recipe prepares for (`check` sets it)

    def check(self, dims: ParallelDims, world: int) -> None:
        """Every rank, before any collective."""
        cfg, c = self.cfg, self.hf_config
        dims.validate(world)
        check_engine(cfg, dims)
        if dims.tp > 1 or dims.pp > 1:
            raise ValueError(
                f"parallel.tp = {dims.tp}, parallel.pp = {dims.pp}: fine-tuning runs data and context parallelism "
                "(Hugging Face modules take no tensor or pipeline plan here); set tp=1 and pp=1"
            )
        dims.check_model(c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        if cfg.parallel.layout in ("balanced", "auto"):  # the pretraining loader's per-pack layouts
            raise ValueError(
                f"parallel.layout {cfg.parallel.layout!r} is chosen per pack by the pretraining data pipeline; "
                "fine-tuning shards by zigzag or contiguous: set one of them"
            )
        dims.check_seq_len(cfg.data.seq_len, cfg.parallel.layout)
        self.cp = dims.cp
        if cfg.finetune.s2_variant == "roll" and (dims.cp > 1 or cfg.data.doc_masking):
            raise ValueError(
                "finetune.s2_variant=roll (an ablation) rolls one whole sequence on one device: set the context "
                "parallel degrees to 1 and data.doc_masking=false"
            )
        if cfg.parallel.activation_offload:
            raise ValueError(
                "parallel.activation_offload: fine-tuning checkpoints through transformers' own per-layer "
                "checkpointing, which keeps its inputs on the device; drop the flag (launch/train.py takes it)"
            )
        if getattr(c, "attention_dropout", 0.0):
            raise ValueError(
                f"{cfg.finetune.model}: attention_dropout = {c.attention_dropout}; lsts attention has none, set it to 0"
            )

    def build(self, dims: ParallelDims, mesh, device: torch.device, dtype: torch.dtype) -> tuple[Update, float]:
        """``(update, flops per token)``: the recipe's model on the mesh with its engine."""
        cfg = self.cfg
        self.model = model = self._recipe_model(device)
        if cfg.parallel.activation_checkpoint != "none":
            # transformers' own per-layer checkpointing (non-reentrant: frozen inputs are fine).
            lm, kwargs = model.causal_lm, {"use_reentrant": False}
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers 5 renamed it; the old name warns
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for layer in model.causal_lm.get_decoder().layers:
            if cfg.parallel.mlp_tile_tokens:
                layer.mlp = tile_tokens(layer.mlp, cfg.parallel.mlp_tile_tokens)  # every decoder's MLP is token-wise
            if cfg.train.compile:  # per layer; lsts attention's host-side work stays outside the graph
                layer.compile()
        n_params = sum(p.numel() for p in model.parameters())
        flops_per_token = 6 * n_params  # attention's share is small at these widths; MFU is approximate
        engine = apply_data_parallel(
            model, model.causal_lm.get_decoder().layers, dims, mesh, cfg.parallel.dp_engine, dtype
        )
        return build_update(cfg, engine, dims, device, dtype, loss_fn=lambda m, *row: m(*row)), flops_per_token

    def _recipe_model(self, device: torch.device) -> CausalLMLoss:
        cfg = self.cfg
        hf = load_extended(cfg.finetune.model, cfg.data.seq_len).to(device)
        hf = self.recipe.prepare(hf, AttentionContext(backend=cfg.kernels.attention), self.cp)
        loss = CausalLMLoss(hf, cfg.kernels.loss_chunk_size, cfg.kernels.loss, self.recipe)
        return loss.train()  # from_pretrained gives eval()

    def check_resume(self, extra: dict) -> None:
        for key, ours in self.checkpoint_extra.items():
            if extra.get(key) != ours:
                raise ValueError(
                    f"the checkpoint in {self.cfg.train.out} was trained with {key} {extra.get(key)!r}, this run has "
                    f"{ours!r}: its trained weights belong to that {key}; resume with it or use another --out"
                )

    def before_step(self, step: int) -> None:
        """The recipe's training-time changes (SPT's switch to sparse attention; also on resume)."""
        self.recipe.before_step(self.model, step)

    def finish(self, update) -> None:
        """Write ``out/merged`` (rank 0) from the gathered weights; every rank takes part."""
        if not self.cfg.finetune.merged:
            return
        state = full_state_dict(update)
        if dist.get_rank() == 0:
            fresh = self._recipe_model(torch.device("cpu"))
            fresh.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
            path = self.recipe.export(fresh.model, self.cfg.train.out)
            if self.cfg.data.tokenizer != "byte":  # the model's tokenizer travels with it
                AutoTokenizer.from_pretrained(self.cfg.data.tokenizer).save_pretrained(path)
            log.info("merged model saved to %s", path)
        dist.barrier()


def full_state_dict(update) -> dict[str, torch.Tensor]:
    """The trained `CausalLMLoss`'s full (unsharded) state dict on rank 0, on CPU; every rank calls."""
    if isinstance(update, zero.ZeroUpdate):
        engine = update.engine
        if engine.zero_optimization_stage() == 3:
            state = engine._zero3_consolidated_16bit_state_dict() or {}  # DeepSpeed's gather to rank 0
        else:
            state = engine.module.state_dict()
        prefix = "model."  # the engine's module is ZeroUpdate's wrapper around ours
        return {k.removeprefix(prefix): v.cpu() for k, v in state.items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(update.model, options=options)


def finetune(cfg: FinetuneRunConfig) -> dict:
    """Run the configured fine-tuning; returns the last step's metrics."""
    from lsts.train.trainer import train

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return train(cfg, FinetuneJob(cfg))


__all__ = ["CausalLMLoss", "FinetuneJob", "finetune", "full_state_dict"]
