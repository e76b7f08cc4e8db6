"""yunchang's (long-context-attention's) sequence-parallel modules on lsts.

`set_seq_parallel_pg` builds the Ulysses and ring groups as yunchang does, records them in
`PROCESS_GROUP` (yunchang's process-wide record, which `LongContextAttention()` and
`UlyssesAttention()` read when no group is passed) and returns them.

`LongContextAttention` is yunchang's hybrid (USP): an all-to-all inside the Ulysses group turns
sequence shards into head shards, ring attention runs across the ring group, and an all-to-all
turns the output back. yunchang's sharding (its ``EXTRACT_FUNC_DICT``): the rank with ring rank r
and Ulysses rank u holds piece u of U contiguous pieces of ring rank r's shard of the sequence,
the shard being chunk r of R (``basic``), chunks r and 2R-1-r of 2R (``zigzag``) or tokens r, r+R,
... (``strip``). The Ulysses all-to-all gathers exactly ring rank r's shard, so lsts runs this
natively with its ``contiguous`` / ``zigzag`` / ``stripe`` ring; `long_context_shard` makes that
sharding. Ranks are read from the groups, so both of yunchang's group layouts work
(``use_ulysses_low`` True: Ulysses groups of consecutive ranks; False: ring groups of consecutive
ranks); groups that are not the two axes of one mesh are a ValueError on first use.

This differs from `lsts.parallel.hybrid_attention`, which takes one lsts layout over all U·R ranks.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from lsts.parallel.checks import attention_setup
from lsts.parallel.comm import agree_across_ranks
from lsts.parallel.compat.flash_args import check_flash_args, flash_span
from lsts.parallel.ring import ring_attention
from lsts.parallel.sharding import layout_indices
from lsts.parallel.ulysses import (
    check_heads,
    heads_to_sequence,
    replicate_kv_heads,
    sequence_to_heads,
    ulysses_attention,
)

RING_IMPL_TYPES = {"basic": "contiguous", "zigzag": "zigzag", "strip": "stripe"}
EXACT_ATTN_TYPES = ("FA", "FA3", "TORCH")  # yunchang's kernels that compute exact attention, as lsts does

PROCESS_GROUP = SimpleNamespace(ULYSSES_PG=None, RING_PG=None)


def set_seq_parallel_pg(sp_ulysses_degree: int, sp_ring_degree: int, rank: int, world_size: int, use_ulysses_low=True):
    """Build the groups of ``world_size / (U·R)`` sequence-parallel blocks of consecutive ranks,
    each a U × R mesh: with ``use_ulysses_low`` the Ulysses groups are consecutive ranks (ring
    groups stride U), otherwise the ring groups are (Ulysses groups stride R). Every rank must call
    it. Records and returns ``(ulysses_pg, ring_pg)`` of this rank."""
    n_uly, n_ring = int(sp_ulysses_degree), int(sp_ring_degree)
    sp = n_uly * n_ring
    if n_uly < 1 or n_ring < 1 or world_size % sp or world_size != dist.get_world_size() or rank != dist.get_rank():
        raise ValueError(
            f"set_seq_parallel_pg: sp_ulysses_degree ({n_uly}) × sp_ring_degree ({n_ring}) must divide world_size "
            f"({world_size}), which with rank ({rank}) must be this process's (world {dist.get_world_size()}, "
            f"rank {dist.get_rank()})"
        )
    mine = {}
    for base in range(0, world_size, sp):
        # mesh[i][j]: the rank at row i, column j of this block; rows are Ulysses groups when low.
        rows, cols = (n_ring, n_uly) if use_ulysses_low else (n_uly, n_ring)
        mesh = [[base + i * cols + j for j in range(cols)] for i in range(rows)]
        lines = {"row": mesh, "column": [list(c) for c in zip(*mesh)]}
        for kind, groups in lines.items():
            for ranks in groups:
                group = dist.new_group(ranks)  # every rank creates every group, in one order
                if rank in ranks:
                    mine[kind] = group
    ulysses_pg, ring_pg = (mine["row"], mine["column"]) if use_ulysses_low else (mine["column"], mine["row"])
    PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = ulysses_pg, ring_pg
    return ulysses_pg, ring_pg


def _recorded(ulysses_pg, ring_pg):
    ulysses_pg = ulysses_pg if ulysses_pg is not None else PROCESS_GROUP.ULYSSES_PG
    ring_pg = ring_pg if ring_pg is not None else PROCESS_GROUP.RING_PG
    if ulysses_pg is None or ring_pg is None:
        raise ValueError(
            "no sequence-parallel groups: call set_seq_parallel_pg() first, or pass ulysses_pg and ring_pg"
        )
    return ulysses_pg, ring_pg


def _ring_layout(ring_impl_type: str) -> str:
    if ring_impl_type not in RING_IMPL_TYPES:
        raise ValueError(f"unknown ring_impl_type {ring_impl_type!r}; choose one of {tuple(RING_IMPL_TYPES)}")
    return RING_IMPL_TYPES[ring_impl_type]


def long_context_shard(x: torch.Tensor, ring_impl_type="basic", dim=1, ulysses_pg=None, ring_pg=None):
    """This rank's shard of the full ``x`` (the same on every rank) in yunchang's hybrid sharding
    (see the module docstring), by the ranks of the recorded or given groups."""
    ulysses_pg, ring_pg = _recorded(ulysses_pg, ring_pg)
    ring_shard = layout_indices(
        x.shape[dim], dist.get_world_size(ring_pg), dist.get_rank(ring_pg), _ring_layout(ring_impl_type)
    )
    n_uly = dist.get_world_size(ulysses_pg)
    if len(ring_shard) % n_uly:
        raise ValueError(f"a ring shard of {len(ring_shard)} tokens does not split over {n_uly} Ulysses ranks")
    return x.index_select(dim, ring_shard.chunk(n_uly)[dist.get_rank(ulysses_pg)].to(x.device))


def _check_module_args(scatter_idx: int, gather_idx: int, attn_type) -> None:
    if (scatter_idx, gather_idx) != (2, 1):
        raise ValueError(
            f"scatter_idx={scatter_idx}, gather_idx={gather_idx}: lsts takes [batch, seq, heads, head_dim] inputs "
            f"(scatter_idx=2, gather_idx=1); transpose other layouts first"
        )
    name = str(getattr(attn_type, "name", attn_type)).upper()
    if attn_type is not None and name not in EXACT_ATTN_TYPES:
        raise ValueError(
            f"attn_type={attn_type}: lsts computes exact attention with its own kernels (choose them with backend=); "
            f"approximate ones (SageAttention, int8) have no lsts counterpart; pass None or one of {EXACT_ATTN_TYPES}"
        )


class _FlashForward(torch.nn.Module):
    """yunchang's ``forward`` signature (FlashAttention's keywords; extra positional arguments are
    refused, not dropped) over ``attend(query, key, value, span, softmax_scale, softcap)``."""

    def forward(
        self,
        query,
        key,
        value,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        *args,
    ):
        check_flash_args(dropout_p, alibi_slopes)
        if return_attn_probs:
            raise ValueError(
                "return_attn_probs=True: yunchang's modules return the output only (they drop the lse); so does lsts. "
                "For the lse call lsts.parallel.hybrid_attention / ulysses_attention with return_lse=True"
            )
        if args:
            raise ValueError(f"{len(args)} extra positional arguments after return_attn_probs: lsts takes none")
        return self.attend(query, key, value, flash_span(causal, window_size), softmax_scale, softcap)


class LongContextAttention(_FlashForward):
    """yunchang's ``LongContextAttention``: ``forward(query, key, value, ...)`` on this rank's
    ``[B, S_local, H, D]`` shards (yunchang's sharding, `long_context_shard`) -> ``[B, S_local, H, D]``.
    ``use_sync`` is accepted (lsts waits for each exchange before using it anyway); ``use_pack_qkv``
    sends q, k, v in one all-to-all (needs ``H_kv == H``). ``ulysses_pg`` / ``ring_pg`` and
    ``backend`` are lsts additions; without the groups, those recorded by `set_seq_parallel_pg`."""

    def __init__(
        self,
        scatter_idx: int = 2,
        gather_idx: int = 1,
        ring_impl_type: str = "basic",
        use_pack_qkv: bool = False,
        use_sync: bool = False,
        attn_type=None,
        *,
        ulysses_pg=None,
        ring_pg=None,
        backend: str = "auto",
    ):
        super().__init__()
        _check_module_args(scatter_idx, gather_idx, attn_type)
        self.layout = _ring_layout(ring_impl_type)
        self.ulysses_pg, self.ring_pg = _recorded(ulysses_pg, ring_pg)
        self.use_pack_qkv, self.use_sync, self.backend = use_pack_qkv, use_sync, backend
        self._mesh_checked = False

    def attend(self, query, key, value, span, softmax_scale, softcap):
        if not self._mesh_checked:
            check_one_mesh(self.ulysses_pg, self.ring_pg)
            self._mesh_checked = True
        n_uly = dist.get_world_size(self.ulysses_pg)

        def check(world: int) -> None:
            check_heads(query.shape[2], world, what="LongContextAttention (ulysses part of)")
            if self.use_pack_qkv and key.shape != query.shape:
                raise ValueError("use_pack_qkv packs q, k, v into one exchange: they need one shape (no GQA)")

        # Shapes agree on the Ulysses ranks before the exchange; ring_attention checks the ring.
        scale, backend = attention_setup(
            query, key, value, self.ulysses_pg, "contiguous", span, softmax_scale, self.backend, check, softcap=softcap
        )
        key, value = replicate_kv_heads(key, value, n_uly)
        if self.use_pack_qkv:
            q, k, v = heads_to_sequence(torch.cat([query, key, value]), self.ulysses_pg).chunk(3)
        else:
            q, k, v = (heads_to_sequence(x, self.ulysses_pg) for x in (query, key, value))
        kw = dict(layout=self.layout, softmax_scale=scale, backend=backend, span=span, softcap=softcap)
        out = ring_attention(q, k, v, self.ring_pg, **kw)
        return sequence_to_heads(out, self.ulysses_pg)


def check_one_mesh(ulysses_pg, ring_pg) -> None:
    """The groups are the two axes of one mesh: every member of our Ulysses group has our ring rank
    (they gather one ring shard) and every member of our ring group our Ulysses rank (they hold the
    same heads). A ValueError on every rank of the group that breaks it."""
    agree_across_ranks(ulysses_pg, {"ring rank (members of one Ulysses group)": dist.get_rank(ring_pg)}, None)
    agree_across_ranks(ring_pg, {"Ulysses rank (members of one ring group)": dist.get_rank(ulysses_pg)}, None)


class UlyssesAttention(_FlashForward):
    """yunchang's (DeepSpeed's) ``UlyssesAttention``: ``forward(query, key, value, ...)`` on this
    rank's contiguous ``[B, S_local, H, D]`` shard -> ``[B, S_local, H, D]``, on lsts'
    `ulysses_attention` (``softmax_scale`` is honoured; yunchang's flash path drops it)."""

    def __init__(
        self,
        sequence_process_group=None,
        scatter_idx: int = 2,
        gather_idx: int = 1,
        use_sync: bool = False,
        attn_type=None,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        _check_module_args(scatter_idx, gather_idx, attn_type)
        self.spg, self.use_sync, self.backend = sequence_process_group, use_sync, backend

    def attend(self, query, key, value, span, softmax_scale, softcap):
        kw = dict(layout="contiguous", softmax_scale=softmax_scale, backend=self.backend, span=span, softcap=softcap)
        return ulysses_attention(query, key, value, self.spg, **kw)
