"""MASFormer: a decoder-only LM (RMSNorm, RoPE, SwiGLU, GQA) whose layers differ only in attention span.

Full causal attention at a few layers, a sliding window or diagonal blocks at the others
(``docs/algorithms.md`` §5; Zhang et al., "Efficient Long-Range Transformers: You Need to Attend More,
but Not Necessarily at Every Layer", 2023). ``ModelConfig.layer_spans`` places them; each
`TransformerBlock` keeps its `Span` and hands it to `lsts.attention.attention`.

The model knows nothing of parallelism. Sequence parallelism arrives as the `AttentionContext`
passed to ``forward`` together with the *global* position ids of this rank's tokens (RoPE angles and
span masks are functions of global positions, so a shard computes what the whole sequence would).
The module tree follows torchtitan's Llama so that the parallelize passes can address it by name:
``tok_embeddings``, ``layers.<i>.attention.{wq,wk,wv,wo}``, ``layers.<i>.feed_forward.{w1,w2,w3}``,
``layers.<i>.{attention_norm,ffn_norm}``, ``norm``, ``output``. ``layers`` is a ModuleDict keyed by
the layer index, so a pipeline stage can delete layers (and set ``tok_embeddings`` / ``norm`` to
None) without renaming the rest.

``forward`` stops at the final norm: the trainer computes the loss with the chunked
`lsts.kernels.loss.linear_cross_entropy` on ``output_weight`` so that ``[tokens, vocab]`` logits
never exist whole; `MASFormer.logits` is there for small evaluations and tests.

Limits: no dropout, no biases, no KV cache (training only); ``init_weights`` runs on materialized
parameters (after ``to_empty`` when the model was built on the meta device).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lsts.attention import LOCAL, AttentionContext, attention
from lsts.config import InvalidConfig, KernelsConfig, ModelConfig
from lsts.kernels.attention import Span
from lsts.kernels.norm import RMSNorm
from lsts.kernels.rope import apply_rope


def check_model_config(cfg: ModelConfig) -> None:
    """`InvalidConfig` for the model rules of `Config.validate`, for a ModelConfig built by hand."""
    errors = cfg.size_errors() or cfg.relation_errors()
    if errors:
        raise InvalidConfig(errors)


class Attention(nn.Module):
    """Grouped-query attention: ``n_heads`` query heads share ``n_kv_heads`` key/value heads."""

    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope_base, self.rope_scaling, self.rope_backend = cfg.rope_base, cfg.rope_scaling, kernels.rope
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, span: Span, ctx: AttentionContext) -> torch.Tensor:
        B, S, _ = x.shape
        # Heads from the projection's width (-1), not the config: tensor parallelism leaves a
        # rank with a slice of the heads.
        q = self.wq(x).view(B, S, -1, self.head_dim)
        k = self.wk(x).view(B, S, -1, self.head_dim)
        v = self.wv(x).view(B, S, -1, self.head_dim)
        rope = {"base": self.rope_base, "scaling_factor": self.rope_scaling, "backend": self.rope_backend}
        q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
        out = attention(q, k, v, span, ctx)  # [B, S, H, head_dim]
        return self.wo(out.reshape(B, S, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(norm(x)); out = h + feed_forward(norm(h))``, attention
    restricted to ``span`` (causal for a full layer, window or block for the others)."""

    def __init__(self, layer_id: int, span: Span, cfg: ModelConfig, kernels: KernelsConfig) -> None:
        super().__init__()
        self.layer_id, self.span = layer_id, span
        self.attention = Attention(cfg, kernels)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, backend=kernels.norm)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, backend=kernels.norm)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext = LOCAL) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, self.span, ctx)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, seed: int, std: float, out_std: float) -> None:
        a, f = self.attention, self.feed_forward
        for name, linear, s in (
            ("attention.wq", a.wq, std),
            ("attention.wk", a.wk, std),
            ("attention.wv", a.wv, std),
            ("attention.wo", a.wo, out_std),
            ("feed_forward.w1", f.w1, std),
            ("feed_forward.w2", f.w2, out_std),
            ("feed_forward.w3", f.w3, std),
        ):
            _normal_(linear.weight, s, seed, f"layers.{self.layer_id}.{name}.weight")
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, span={self.span}"


class MASFormer(nn.Module):
    """The decoder LM. ``forward(tokens [B, S], positions [S] or [B, S], ctx) -> hidden [B, S, dim]``
    (after the final norm; see `output_weight` and `logits` for the vocabulary projection)."""

    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig | None = None) -> None:
        super().__init__()
        check_model_config(cfg)
        kernels = kernels if kernels is not None else KernelsConfig()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict(
            {
                str(i): TransformerBlock(i, Span(kind, size), cfg, kernels)
                for i, (kind, size) in enumerate(cfg.layer_spans())
            }
        )
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps, backend=kernels.norm)
        # Tied: the embedding table is the projection, so there is no second parameter to keep in sync.
        self.output: nn.Linear | None = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext = LOCAL) -> torch.Tensor:
        """``tokens [B, S]`` int64, or hidden states ``[B, S, dim]`` on a pipeline stage without
        ``tok_embeddings``; ``positions`` are the tokens' *global* ids (int64) — under sequence
        parallelism those of this rank's shard, not ``arange(S)``. Returns ``[B, S, dim]``."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if h.dim() != 3:
            what = "tokens [B, S]" if self.tok_embeddings is not None else "hidden states [B, S, dim] (no embedding)"
            raise ValueError(f"MASFormer expects {what}, got shape {tuple(tokens.shape)}")
        for block in self.layers.values():
            h = block(h, positions, ctx)
        return self.norm(h) if self.norm is not None else h

    @property
    def output_weight(self) -> torch.Tensor:
        """The ``[vocab, dim]`` projection of `linear_cross_entropy`: the embedding's when tied."""
        if self.output is not None:
            return self.output.weight
        if self.tok_embeddings is None:
            raise ValueError("tied output weight lives in tok_embeddings, which this (pipeline) stage does not hold")
        return self.tok_embeddings.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., dim] -> [..., vocab]``: whole logits, for small evaluations and tests only."""
        return F.linear(hidden, self.output_weight)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, init_std) weights, ones for norms; the projections back into the residual
        stream (``wo``, ``w2``) get std ``init_std / sqrt(2 n_layers)`` so that the residual's
        variance does not grow with depth (GPT-2's scaling).

        Each tensor draws from its own generator seeded by ``seed`` and its name, so a pipeline
        stage holding layers 4-7 gets the same weights as the whole model, and a DTensor parameter
        (TP / FSDP2) gets its shard of the same full tensor. Same seed, same device type: same
        weights, whatever the dtype up to rounding (drawn in float32)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        if self.tok_embeddings is not None:
            _normal_(self.tok_embeddings.weight, std, seed, "tok_embeddings.weight")
        for block in self.layers.values():
            block.init_weights(seed, std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            _normal_(self.output.weight, std, seed, "output.weight")

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters of this module (a tied weight once). ``exclude_embedding`` leaves out the
        embedding table unless it is also the output projection: the lookup does no arithmetic."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.tok_embeddings is not None and self.output is not None:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``, for MFU:

            6 · N  +  Σ_layers 12 · dim · ctx(layer)

        ``N`` = `num_params` without the embedding lookup (each parameter does a multiply-add in
        the forward and two in the backward). Attention: QKᵀ and PV cost 2 · 2 · dim · ctx per token
        forward, times 3 with the backward. ``ctx`` is the key span each query is charged for:
        ``seq_len`` for a full causal layer (PaLM's convention, which torchtitan keeps: the masked
        half of the square is counted), ``min(w, seq_len)`` for a window and ``min(b, seq_len)`` for
        a block layer — so the attention term follows ``docs/algorithms.md`` §5's cost ratio
        ``(l·n + (L-l)·b) / (L·n)``. Counts the layers this module holds (a pipeline stage: its own)."""
        attn = 0
        for block in self.layers.values():
            ctx = seq_len if block.span.kind in ("causal", "full") else min(block.span.size, seq_len)
            attn += 12 * self.cfg.dim * ctx
        return 6 * self.num_params(exclude_embedding=True) + attn


def _normal_(param: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill ``param`` from a generator seeded by ``(seed, name)``; a DTensor gets its local shard."""
    device = param.device
    # A hash, not arithmetic on the seed: the CPU generator keeps only the low 32 bits of its seed.
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))
    full = torch.empty(param.shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank drew the same full tensor, so each keeps its shard locally.
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


__all__ = ["Attention", "FeedForward", "MASFormer", "TransformerBlock", "check_model_config"]
