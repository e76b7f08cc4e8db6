"""Split-K decoding: attention of a few new queries against a long KV cache, cut into equal work
units whose partial ``(out, lse)`` are merged (``docs/algorithms.md`` §1, §9).

Lean Attention (and FlashDecoding before it) observes that in the decode phase there are too few
queries to keep a device busy, so the *keys* are split instead: every unit attends the same queries
to its slice of the cache and the partial results fold together with the associative merge rule of
`lsts.kernels.attention.merge_into`. The same rule merges across ranks when the cache is sharded
over a process group (context-parallel decoding): each rank reduces its own units, then the ranks
exchange one ``(out, lse)`` each.

Positions: the queries are the last ``Sq`` positions of the whole key sequence (they were appended
to the cache before attention, as Hugging Face does), so query ``i`` sees key ``j`` iff
``j <= Sk_total - Sq + i``; with ``Sq == 1`` that is every key. Units that lie entirely before the
first query see no mask and run the unmasked (fused) kernel.

Limits: inference only (no autograd graph is built; use `lsts.kernels.attention.attention` to train).
Sharded caches use one layout: contiguous key ranges in rank order (rank 0 holds the oldest keys),
any lengths, empty shards allowed; the queries must be the same on every rank. The work is split
per rank, not balanced across ranks as Lean Attention's stream-K schedule does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lsts.kernels.attention import CAUSAL, FULL, attention_fwd, check_qkv, default_scale, merge_into, resolve_backend


def split_bounds(length: int, n_splits: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the work units of ``length`` keys: ``ceil(length / n_splits)`` keys each,
    the last one shorter when it does not divide (so there may be fewer than ``n_splits`` units)."""
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    size = max(1, math.ceil(length / n_splits))
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def _shard_offsets(length: int, group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(k_offset, total)``: where this rank's contiguous key range starts, and the global length."""
    if group is None:
        return 0, length
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(lengths, torch.tensor([length], dtype=torch.int64), group=group)
    sizes = [int(n) for n in lengths]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _merge_ranks(out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Replace this rank's partial ``(out, lse)`` by the merge of every rank's, in rank order, so
    that all ranks hold bit-identical results."""
    world = dist.get_world_size(group)
    outs = [torch.empty_like(out) for _ in range(world)]
    lses = [torch.empty_like(lse) for _ in range(world)]
    dist.all_gather(outs, out.contiguous(), group=group)
    dist.all_gather(lses, lse.contiguous(), group=group)
    out.zero_()
    lse.fill_(float("-inf"))
    for o, s in zip(outs, lses):
        merge_into(out, lse, o, s)


@torch.no_grad()
def split_k_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_splits: int,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention by split-K: ``(out [B, Sq, H, D], lse [B, H, Sq])``.

    ``q [B, Sq, H, D]`` are the last ``Sq`` positions of the keys; ``k, v [B, Sk, H_kv, D]`` (GQA:
    ``H % H_kv == 0``) are the local cache, cut into ``n_splits`` units (`split_bounds`). With
    ``group`` the cache is sharded over its ranks in contiguous key ranges, rank order; every rank
    passes the same ``q`` and gets the same result. ``lse`` is float32 (float64 for float64 inputs);
    a query that sees no key (only possible with an empty cache) gets ``out = 0``, ``lse = -inf``.
    Inference only: no gradient flows."""
    check_qkv(q, k, v)
    backend = resolve_backend(backend, q.device)
    scale = default_scale(q.shape[-1], softmax_scale)
    k_offset, total = _shard_offsets(k.shape[1], group)
    sq = q.shape[1]
    if sq > total:
        raise ValueError(f"{sq} queries but only {total} keys: the queries must be the last positions of the keys")
    q_offset = total - sq  # query i sits at global position q_offset + i
    acc = torch.promote_types(q.dtype, torch.float32)
    b, _, h, d = q.shape
    out = torch.zeros(b, sq, h, d, dtype=acc, device=q.device)
    lse = torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
    for start, end in split_bounds(k.shape[1], n_splits):
        # A unit that ends at or before the first query's position is seen whole by every query.
        span = FULL if k_offset + end <= q_offset + 1 else CAUSAL
        # unrounded: the parts stay float32 until the one rounding after the merge.
        part_out, part_lse = attention_fwd(
            q, k[:, start:end], v[:, start:end], scale, span, backend, q_offset, k_offset + start, unrounded=True
        )
        merge_into(out, lse, part_out, part_lse)
    if group is not None:
        _merge_ranks(out, lse, group)
    return out.to(q.dtype), lse


__all__ = ["split_bounds", "split_k_attention"]
