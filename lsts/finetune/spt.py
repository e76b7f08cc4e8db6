"""SPT fine-tuning of Hugging Face decoders (``docs/algorithms.md`` §8): sparse MHA, routed FFN, LoRA.

`prepare_spt(model, config, ctx)` does one pass over a loaded model:

1. attention runs on lsts through ``transformers.AttentionInterface`` under the name ``"lsts_spt"``
   (`lsts.models.hf` registers and wires ``"lsts"``; this function wraps it), and each attention
   module gets a `ProductQuantizer` (``spt_pq``) over its head dim;
2. every MLP of the LlamaMLP kind (``gate_proj``, ``up_proj``, ``down_proj``, SwiGLU) or of the GELU
   kind (``fc1``, ``fc2``) becomes a `RoutedMLP` that keeps the pretrained projections (hidden units
   in 4 blocks) and adds a sigmoid router;
3. LoRA (peft, rank 16, alpha 32) goes on the attention projections every LoRA recipe adapts and on
   the FFN projections (`lsts.finetune.targets`: `lora_targets` extended by `mlp_targets`, found
   before the routers exist); the routers and the codebooks stay trainable.

Staging (`set_stage`): ``"dense"`` first — full causal attention, while each attention module's
codebook loss is computed on its q and k (`aux_loss` returns it, weighted, for the trainer to add);
then ``"sparse"`` — each query attends its top ``L = N/8`` keys by code collisions
(`lsts.kernels.spt.sparse_attention`); the codebook loss keeps running so the codes follow q and k.

`SPTRecipe` is the ``spt`` fine-tuning method (`lsts.finetune.methods`): its hooks prepare the
model, switch to the sparse stage after ``finetune.spt_dense_steps`` steps, add `aux_loss` and
export the merged model through `strip_spt`.

Sequence parallelism: the routed FFN is per token and composes with any layout; the dense stage
uses lsts attention with the given ``ctx`` (ring, Ulysses, hybrid). Sparse MHA needs ``ctx`` local
(cp = 1): a query's top-L keys may lie anywhere in its causal prefix, so on a sharded sequence
every rank would need all ranks' key codes and arbitrary remote K/V rows — neither the ring's
fixed blocks nor the online-softmax merge fit a per-query budget over the whole prefix. (Ulysses
could host it — after its all-to-all each rank holds whole sequences for a subset of heads — but
that is not wired here.)

Limits: the sparse stage takes unpadded batches (pack sequences instead) and is a training device;
decoding against a KV cache runs dense attention. The aux loss is the mean over attention modules
of each module's codebook loss, times ``aux_weight`` (the per-layer mean is our choice,
**(unconfirmed)**).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from lsts.attention import LOCAL, AttentionContext
from lsts.finetune.recipes import Recipe, merged, save_plain
from lsts.finetune.targets import lora_config, lora_targets, mlp_targets
from lsts.kernels.spt import ProductQuantizer, budget_for, routed_ffn, select_keys, sparse_attention
from lsts.models.hf import attention_modules, lsts_attention_forward, use_lsts_attention

log = logging.getLogger(__name__)

NAME = "lsts_spt"
STAGES = ("dense", "sparse")
_SWIGLU = ("gate_proj", "up_proj", "down_proj")
_GELU = ("fc1", "fc2")


@dataclass(frozen=True)
class SPTConfig:
    """What `prepare_spt` builds (defaults: the SPT paper's)."""

    sparse_attention: bool = True
    """Sparse MHA in the sparse stage (needs cp = 1); False keeps dense attention throughout."""
    routed_ffn: bool = True
    """Replace the MLPs by routed ones."""
    budget_ratio: float = 1 / 8
    """Keys per query: L = ceil(N · budget_ratio)."""
    clamp: float = 10.0
    """Sparse-attention logits are clamped to [-clamp, clamp]."""
    sub_dim: int = 8
    """Dims per product-quantizer sub-vector."""
    n_codes: int = 16
    """Codewords per sub-space."""
    aux_weight: float = 1e-2
    """Weight of the codebook loss."""
    n_blocks: int = 4
    """Blocks of FFN hidden units."""
    top_k: int = 2
    """Blocks per token."""
    lora_r: int = 16
    lora_alpha: int = 32
    backend: str = "auto"
    """Backend of the SPT kernels (`lsts.kernels.backend`); attention's own comes from ``ctx``."""


# ------------------------------------------------------------------------------------- routed MLP


def _weight_and_bias(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear's effective weight: with active, unmerged LoRA adapters (peft), ``W + s·B A``, so
    the adapters train through the routed FFN, which reads weights instead of calling the layer."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = base.weight
    if hasattr(layer, "lora_A") and not getattr(layer, "merged", False) and not layer.disable_adapters:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + (layer.lora_B[name].weight @ layer.lora_A[name].weight) * layer.scaling[name]
    return weight, base.bias


def _mlp_kind(module: nn.Module) -> str | None:
    linear = lambda name: isinstance(getattr(module, name, None), nn.Linear)  # noqa: E731
    if all(linear(n) for n in _SWIGLU) and hasattr(module, "act_fn"):
        return "swiglu"
    if all(linear(n) for n in _GELU) and any(hasattr(module, a) for a in ("activation_fn", "act_fn", "act")):
        return "gelu"
    return None


class RoutedMLP(nn.Module):
    """An MLP's pretrained projections used block-wise by `routed_ffn`, plus a sigmoid router
    (``spt_router``, ``d -> n_blocks``, no bias; small init, so ``2·p ≈ 1`` at the start)."""

    def __init__(self, mlp: nn.Module, n_blocks: int = 4, top_k: int = 2, backend: str = "auto") -> None:
        super().__init__()
        self.kind = _mlp_kind(mlp)
        if self.kind is None:
            raise ValueError(f"{type(mlp).__name__} is neither a gate/up/down SwiGLU nor an fc1/fc2 MLP")
        names = _SWIGLU if self.kind == "swiglu" else _GELU
        if self.kind == "swiglu" and mlp.gate_proj.bias is not None:
            raise ValueError(f"{type(mlp).__name__} has a biased gate projection, which the routed FFN does not take")
        for name in names:
            setattr(self, name, getattr(mlp, name))
        self.act = next(getattr(mlp, a) for a in ("act_fn", "activation_fn", "act") if hasattr(mlp, a))
        up = self.up_proj if self.kind == "swiglu" else self.fc1
        if up.out_features % n_blocks:
            raise ValueError(f"{up.out_features} hidden units do not split into {n_blocks} equal blocks")
        self.n_blocks, self.top_k, self.backend = n_blocks, top_k, backend
        self.__dict__["dense"] = mlp  # not a submodule: `strip_spt` puts it back, with these projections
        self.spt_router = nn.Linear(up.in_features, n_blocks, bias=False, device=up.weight.device)
        nn.init.normal_(self.spt_router.weight, std=1.0 / up.in_features)
        self.spt_router.to(up.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kind == "swiglu":
            (w_gate, _), (w_up, b_up), (w_down, b_down) = (_weight_and_bias(getattr(self, n)) for n in _SWIGLU)
        else:
            w_gate, ((w_up, b_up), (w_down, b_down)) = None, (_weight_and_bias(getattr(self, n)) for n in _GELU)
        out = routed_ffn(
            flat, self.spt_router(flat), w_up, w_down, self.act, w_gate=w_gate, b_up=b_up, b_down=b_down,
            n_blocks=self.n_blocks, top_k=self.top_k, backend=self.backend,
        )  # fmt: skip
        return out.view_as(x)


def _route_mlps(model: nn.Module, config: SPTConfig) -> int:
    """Swap every recognised MLP for a `RoutedMLP`; returns how many."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if _mlp_kind(child) is not None and not isinstance(child, RoutedMLP)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, RoutedMLP(child, config.n_blocks, config.top_k, config.backend))
    return len(swaps)


def strip_spt(model: nn.Module) -> nn.Module:
    """Undo `prepare_spt` on a model whose LoRA is merged (``merge_and_unload``): each `RoutedMLP`
    becomes its original MLP again (with the merged projections; the router is dropped) and the
    quantizers leave the attention modules, so ``save_pretrained`` writes a checkpoint that plain
    transformers loads. It then computes the *dense* FFN and full attention: SPT's routing and
    sparsity are fine-tuning devices, as in the paper. Returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RoutedMLP):
                dense = child.dense
                for proj in _SWIGLU if child.kind == "swiglu" else _GELU:
                    setattr(dense, proj, getattr(child, proj))
                setattr(parent, name, dense)
    for module in attention_modules(model):
        for attr in ("spt_pq", "spt_config", "spt_stage", "spt_aux_loss"):
            if hasattr(module, attr):
                delattr(module, attr)
    return model


# -------------------------------------------------------------------------------------- attention


def spt_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention-interface entry (``query [B, H, S, D]``, ``key, value [B, H_kv, S, D]``): the
    codebook loss while training, then dense lsts attention or, in the sparse stage, sparse MHA."""
    config: SPTConfig = module.spt_config
    if not bool(module.spt_pq.initialized):
        module.spt_pq.initialize(torch.cat([query.transpose(1, 2).flatten(0, 2), key.transpose(1, 2).flatten(0, 2)]))
    if module.training and torch.is_grad_enabled():
        module.spt_aux_loss = module.spt_pq.codebook_loss(query, key)
    if module.spt_stage != "sparse" or query.shape[2] != key.shape[2]:  # dense stage, or decoding
        return lsts_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None:
        raise ValueError("SPT's sparse attention takes unpadded batches; pack the sequences instead of padding")
    if dropout:
        raise ValueError(f"SPT's sparse attention has no dropout (got {dropout}); set attention_dropout to 0")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    pq: ProductQuantizer = module.spt_pq
    budget = budget_for(q.shape[1], config.budget_ratio)
    idx = select_keys(pq.encode(q), pq.encode(k), budget, pq.n_codes, config.backend)
    return sparse_attention(q, k, v, idx, scaling, config.clamp, config.backend)[0], None


def register() -> None:
    """Make ``attn_implementation="lsts_spt"`` available to every transformers model (idempotent)."""
    AttentionInterface.register(NAME, spt_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def _check_sparse_ctx(ctx: AttentionContext) -> None:
    if ctx.mode != "local":
        raise ValueError(
            f"SPT's sparse MHA cannot run with context parallelism (attention mode {ctx.mode!r}): each query's "
            "top-L keys may lie anywhere in its causal prefix, on any rank, so the selection would need every "
            "rank's key codes and arbitrary remote K/V rows. Use cp=1, or SPTConfig(sparse_attention=False) to keep "
            "the routed FFN (which composes with any sequence parallelism) and dense attention"
        )


# ------------------------------------------------------------------------------------------ API


def prepare_spt(model: nn.Module, config: SPTConfig = SPTConfig(), ctx: AttentionContext = LOCAL) -> nn.Module:
    """SPT on a Hugging Face decoder, in the dense stage: returns the peft model to train. The
    trainer adds `aux_loss` to its loss and calls ``set_stage(model, "sparse")`` when the codebooks
    have trained (SPT: after a first part of fine-tuning)."""
    if config.sparse_attention:
        _check_sparse_ctx(ctx)
    use_lsts_attention(model, None, ctx)  # validates the model, sets lsts_span / lsts_ctx per module
    register()
    model.set_attn_implementation(NAME)
    modules = attention_modules(model)
    for module in modules:
        head_dim = getattr(module, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        weight = next(module.parameters())
        module.spt_pq = ProductQuantizer(head_dim, config.sub_dim, config.n_codes).to(weight.device)
        module.spt_config, module.spt_stage, module.spt_aux_loss = config, "dense", None
    # The routed MLP keeps the projections under their names, so targets found now still name them.
    targets = lora_targets(model) + (mlp_targets(model) if config.routed_ffn else [])
    lora = lora_config(model, targets, config.lora_r, config.lora_alpha)
    if config.routed_ffn:
        _route_mlps(model, config)
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "spt_router" in name or "spt_pq" in name:
            p.requires_grad_(True)
    calibrate(model, model.config.vocab_size)  # now, before any engine shards the codebooks
    return model


@torch.no_grad()
def calibrate(model: nn.Module, vocab_size: int, n_tokens: int = 512, seed: int = 0) -> None:
    """Initialize every codebook from one forward of ``n_tokens`` seeded random tokens, the same on
    every rank (`prepare_spt` does it). It must happen before an engine shards the model: an
    initialization inside a sharded forward would write a temporary unsharded copy (FSDP2) and
    could differ between ranks, both silently."""
    ids = torch.randint(0, vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    modules = attention_modules(model)
    contexts = [m.lsts_ctx for m in modules]
    for m in modules:  # one whole sequence on this process, whatever the model will be sharded over
        m.lsts_ctx = replace(m.lsts_ctx, mode="local", documents=None)
    try:
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for m, ctx in zip(modules, contexts):
            m.lsts_ctx = ctx


def _spt_modules(model: nn.Module) -> list[nn.Module]:
    modules = [m for m in model.modules() if hasattr(m, "spt_pq")]
    if not modules:
        raise ValueError("the model has no SPT attention modules; call prepare_spt(model) first")
    return modules


def set_stage(model: nn.Module, stage: str) -> None:
    """``"dense"``: full attention (codebooks train); ``"sparse"``: top-L sparse MHA. ValueError for
    a sparse stage the model cannot run (sparse attention off, sequence parallelism, untrained codebooks)."""
    if stage not in STAGES:
        raise ValueError(f"unknown SPT stage {stage!r}; choose one of {STAGES}")
    modules = _spt_modules(model)
    for module in modules:
        if stage == "sparse":
            if not module.spt_config.sparse_attention:
                raise ValueError("this model was prepared with SPTConfig(sparse_attention=False)")
            _check_sparse_ctx(module.lsts_ctx)
            if not bool(module.spt_pq.initialized):
                raise ValueError("the codebooks are not initialized; prepare_spt calibrates them")
        module.spt_stage = stage


def aux_loss(model: nn.Module) -> torch.Tensor:
    """``aux_weight ×`` the mean codebook loss of the attention modules in the last training forward
    (0 if none has run)."""
    modules = _spt_modules(model)
    losses = [m.spt_aux_loss for m in modules if m.spt_aux_loss is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return modules[0].spt_config.aux_weight * torch.stack(losses).mean()


class SPTRecipe(Recipe):
    """The ``spt`` fine-tuning method: `prepare_spt` with SPT's own LoRA rank and alpha (16 / 32,
    whatever ``finetune.lora_r`` / ``lora_alpha`` say); dense attention while the codebooks train,
    sparse MHA after ``finetune.spt_dense_steps`` steps (cp = 1 only: under context parallelism the
    routed FFN and LoRA train with dense attention); `aux_loss` added; the merged export is a plain
    model again (`strip_spt`)."""

    def prepare(self, model: nn.Module, ctx: AttentionContext = LOCAL, cp: int = 1) -> nn.Module:
        if cp > 1:
            log.info("spt with context parallelism: routed FFN and LoRA, dense attention (sparse MHA needs cp = 1)")
        return prepare_spt(model, SPTConfig(sparse_attention=cp == 1, backend=ctx.backend), ctx)

    def before_step(self, model: nn.Module, step: int) -> None:
        """The switch to sparse attention after the dense steps (at least one: the codebooks train first)."""
        first = _spt_modules(model)[0]
        due = step > max(self.settings.spt_dense_steps, 1) and first.spt_config.sparse_attention
        if due and first.spt_stage != "sparse":
            set_stage(model, "sparse")
            log.info("step %d: SPT switches to sparse attention", step)

    def aux_loss(self, model: nn.Module) -> torch.Tensor:
        return aux_loss(model)  # the module's function: the weighted codebook loss

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        """Plain transformers runs the dense FFN and full attention of the merged weights."""
        return save_plain(strip_spt(merged(model)), out_dir)


__all__ = [
    "NAME",
    "STAGES",
    "RoutedMLP",
    "SPTConfig",
    "SPTRecipe",
    "aux_loss",
    "calibrate",
    "prepare_spt",
    "register",
    "set_stage",
    "spt_attention_forward",
    "strip_spt",
]
