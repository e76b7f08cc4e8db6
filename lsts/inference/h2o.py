"""H2O KV-cache eviction with the A2SF forgetting factor, as a ``transformers.Cache`` (``docs/algorithms.md`` §7).

H2O ("Heavy-Hitter Oracle", Zhang et al. 2023) keeps, per layer and per K/V head, the ``recent``
newest tokens plus the ``heavy`` older tokens with the largest accumulated attention score; A2SF
(Jo & Shin 2024) decays that score so that old attention fades: ``s <- alpha * s + a_t``, where
``a_t[j]`` is the attention probability key ``j`` got from the query of step ``t``, summed over the
query heads that share the K/V head (GQA). ``alpha = 1`` is H2O. A step of ``n`` new tokens counts
as ``n`` steps: ``s <- alpha**n * s + sum_i alpha**(n-1-i) * a_i``, so a prefill scores its prompt
exactly as token-by-token decoding would have.

How it plugs in: `H2OCache` is the ``cache`` of ``model.generate`` (``past_key_values`` is the
deprecated alias) for a model on ``attn_implementation="lsts"`` (`lsts.models.hf.use_lsts_attention`).
`attach_h2o` sets it as ``lsts_observer`` of every attention module; the lsts attention function
then reports ``(q, k, lse)`` of each call, and the cache scores the keys (`accumulated_attention`,
chunked over queries with that lse, so a long prompt never materializes ``[N, N]``) and evicts
(`keep_indices`). Eviction runs after the attention of a step, as in H2O's algorithm: during a
forward a layer holds at most ``heavy + recent`` past tokens plus the new ones, after it at most
``heavy + recent``.

Positions: keys are cached after RoPE, so dropping some needs no re-rotation; the kept keys stay in
position order and the new tokens are appended last, so "the queries are the last keys" (the causal
rule of the decode branch) still holds. `get_seq_length` counts every token seen, which is what
transformers uses for the positions of new tokens. Heads keep different positions but the same
number of them, so the cache stays one rectangular tensor per layer.

Limits: unpadded batches only (the padding mask does not follow per-head eviction); causal spans;
local attention (no sequence parallelism); no beam-search rollback (``crop``). The scores are an
extra ``[B, H_kv, heavy + recent]`` float32 tensor per layer.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from lsts.kernels.attention import default_scale
from lsts.models.hf import NAME, attention_modules

CHUNK_ELEMENTS = 1 << 22  # probabilities materialized at once by `accumulated_attention` (16 MiB in fp32)


def accumulated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float | None = None,
    alpha: float = 1.0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``a [B, H_kv, Sk]``: the attention probability each key got from the queries, summed over the
    query heads of its K/V group, query ``i`` of ``Sq`` weighted by ``alpha**(Sq-1-i)``.

    ``q [B, Sq, H, D]`` are the last ``Sq`` positions of ``k [B, Sk, H_kv, D]`` (causal);
    ``lse [B, H, Sq]`` is the log-sum-exp of the same attention call. The probabilities are
    rebuilt from it in chunks of queries holding about ``chunk_elements`` entries, never
    ``[Sq, Sk]`` whole. Float32 (float64 for float64 inputs)."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = default_scale(d, softmax_scale)
    # Query head h reads K/V head h // (H / H_kv), as in the kernels' GQA expansion.
    qg = q.to(acc).view(b, sq, h_kv, h // h_kv, d)
    ka = k.to(acc)
    lse = lse.to(acc).view(b, h_kv, h // h_kv, sq)
    lse = lse.masked_fill(torch.isinf(lse), 0.0)  # a row that saw nothing has no probabilities
    weights = torch.tensor(alpha, dtype=acc, device=q.device) ** torch.arange(sq - 1, -1, -1, device=q.device)
    k_pos = torch.arange(sk, device=q.device)
    total = torch.zeros(b, h_kv, sk, dtype=acc, device=q.device)
    chunk = max(1, chunk_elements // max(1, b * h * sk))
    for start in range(0, sq, chunk):
        end = min(start + chunk, sq)
        s = torch.einsum("bqngd,bknd->bngqk", qg[:, start:end], ka) * scale  # [B, H_kv, G, c, Sk]
        p = torch.exp(s - lse[..., start:end, None])
        q_pos = torch.arange(start, end, device=q.device) + (sk - sq)
        p = p.masked_fill(k_pos[None, :] > q_pos[:, None], 0.0)
        total += torch.einsum("bngqk,q->bnk", p, weights[start:end])
    return total


def keep_indices(scores: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    """Ascending indices ``[..., K]`` of the entries of ``scores [..., L]`` (oldest first) that H2O
    keeps: the last ``recent`` ones and the ``heavy`` largest of the others; all of them when
    ``L <= heavy + recent``."""
    length = scores.shape[-1]
    if length <= heavy + recent:
        return torch.arange(length, device=scores.device).expand(*scores.shape[:-1], length)
    older = length - recent
    top = scores[..., :older].topk(heavy, dim=-1).indices.sort(dim=-1).values
    tail = torch.arange(older, length, device=scores.device).expand(*scores.shape[:-1], recent)
    return torch.cat([top, tail], dim=-1)


class H2OLayer(DynamicLayer):
    """One layer of `H2OCache`: ``keys, values [B, H_kv, L, D]`` plus, per kept entry, its score and
    its position (``scores``, ``positions [B, H_kv, L]``). ``cumulative_length`` counts every token
    seen; ``pending`` the new tokens whose attention has not been reported yet."""

    is_croppable = False

    def __init__(self, heavy: int, recent: int, alpha: float):
        super().__init__()
        self.heavy, self.recent, self.alpha = heavy, recent, alpha
        self.cumulative_length = 0
        self.pending = 0
        self.scores: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h_kv = key_states.shape[:2]
        acc = torch.promote_types(key_states.dtype, torch.float32)
        self.scores = torch.zeros(b, h_kv, 0, dtype=acc, device=self.device)
        self.positions = torch.zeros(b, h_kv, 0, dtype=torch.long, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending:
            raise ValueError(
                "H2OCache: the attention of the previous step was never reported, so nothing was evicted; "
                "run the model on attn_implementation='lsts' and call attach_h2o(model, cache) first"
            )
        keys, values = super().update(key_states, value_states)
        n = key_states.shape[-2]
        new = torch.arange(self.cumulative_length, self.cumulative_length + n, device=self.device)
        self.positions = torch.cat([self.positions, new.expand(*self.positions.shape[:2], n)], dim=-1)
        self.cumulative_length += n
        self.pending = n
        return keys, values

    def observe(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, softmax_scale: float | None) -> None:
        """Score the keys with this step's attention (``q [B, Sq, H, D]``, ``k [B, Sk, H_kv, D]``,
        ``lse [B, H, Sq]``), then evict down to ``heavy + recent`` per head."""
        held = 0 if self.keys is None else self.keys.shape[-2]
        if q.shape[1] != self.pending or k.shape[1] != held:
            raise ValueError(
                f"H2OCache got attention of {q.shape[1]} queries over {k.shape[1]} keys, but its layer holds "
                f"{held} keys of which {self.pending} are new: the model ran with another cache "
                f"(or none); call detach_h2o(model) before using it without this cache"
            )
        a = accumulated_attention(q, k, lse, softmax_scale, self.alpha)
        old = self.scores * self.alpha ** q.shape[1]
        self.scores = torch.cat([old, old.new_zeros(*old.shape[:2], self.pending)], dim=-1) + a.to(old.dtype)
        self.pending = 0
        self.evict()

    def evict(self) -> None:
        """Keep `keep_indices` of the scores in every row (batch, K/V head)."""
        idx = keep_indices(self.scores, self.heavy, self.recent)
        if idx.shape[-1] == self.scores.shape[-1]:
            return
        rows = idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, rows), self.values.gather(2, rows)
        self.scores, self.positions = self.scores.gather(2, idx), self.positions.gather(2, idx)

    def get_seq_length(self) -> int:
        """Tokens seen (not kept): transformers places new tokens at this position."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (0 if self.keys is None else self.keys.shape[-2]) + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.scores = self.positions = None
        self.pending = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("H2OCache cannot be cropped: evicted tokens are gone (no assisted or beam rollback)")

    def _select(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values, self.scores, self.positions = (
                fn(x) for x in (self.keys, self.values, self.scores, self.positions)
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda x: x[indices])


class H2OCache(Cache):
    """H2O / A2SF KV cache: per layer and K/V head, at most ``heavy + recent`` tokens after each
    forward. ``alpha`` in ``[0, 1]`` is the A2SF forgetting factor (1 = H2O). Use a fresh cache (or
    ``reset()``) per ``generate`` call, attached to the model with `attach_h2o`."""

    def __init__(self, heavy: int, recent: int, alpha: float = 1.0):
        if heavy < 0 or recent < 0 or heavy + recent < 1:
            raise ValueError(f"H2OCache needs heavy >= 0, recent >= 0 and a budget >= 1; got {heavy=}, {recent=}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"the A2SF forgetting factor alpha must lie in [0, 1], got {alpha}")
        super().__init__(layer_class_to_replicate=functools.partial(H2OLayer, heavy, recent, alpha))
        self.heavy, self.recent, self.alpha = heavy, recent, alpha

    @property
    def budget(self) -> int:
        return self.heavy + self.recent

    def observe(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, softmax_scale: float | None
    ) -> None:
        """Called by lsts attention after layer ``layer_idx`` attended (see `H2OLayer.observe`)."""
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"H2OCache has no layer {layer_idx} yet: the model ran without this cache; "
                f"pass it to generate (cache=...) or call detach_h2o(model)"
            )
        self.layers[layer_idx].observe(q, k, lse, softmax_scale)


def attach_h2o(model: nn.Module, cache: H2OCache) -> H2OCache:
    """Make ``model``'s lsts attention report to ``cache`` (see the module docstring); returns it.
    ValueError when the model does not run lsts attention, local and causal."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        raise ValueError("H2OCache scores keys inside lsts attention: call use_lsts_attention(model) first")
    for module in attention_modules(model):
        span, ctx = getattr(module, "lsts_span", None), getattr(module, "lsts_ctx", None)
        if span is not None and span.kind != "causal":
            raise ValueError(f"H2OCache keeps arbitrary past positions, so it needs causal spans; got {span}")
        if ctx is not None and (ctx.mode != "local" or ctx.documents is not None):
            raise ValueError(f"H2OCache decodes one unpacked sequence per row with local attention; got {ctx}")
        module.lsts_observer = cache
    return cache


def detach_h2o(model: nn.Module) -> None:
    """Stop ``model``'s attention modules from reporting to a cache."""
    for module in attention_modules(model):
        if hasattr(module, "lsts_observer"):
            del module.lsts_observer


__all__ = ["H2OCache", "H2OLayer", "accumulated_attention", "attach_h2o", "detach_h2o", "keep_indices"]
