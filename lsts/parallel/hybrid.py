"""Hybrid sequence parallelism (USP): Ulysses all-to-all inside a sub-group × ring across sub-groups.

With ``U`` ranks per Ulysses group and ``R`` Ulysses groups, the sequence is sharded over all
``P = U·R`` ranks by `shard_sequence` on the whole group, where the rank of (ring r, ulysses u) is
``r·U + u`` — the row-major order of a DeviceMesh with axes ``(ring, ulysses)``. The all-to-all
inside a Ulysses group gathers ``H/U`` heads of the tokens of its ``U`` ranks, which under the
zigzag and contiguous layouts are exactly ring rank r's shard of a zigzag / contiguous layout over R
ranks: a local permutation puts them in that order, ring attention runs across the groups, and the
way back mirrors the way in. Ulysses traffic stays inside a node; the ring crosses nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lsts.kernels.attention import CAUSAL, Documents, Span, as_documents, attend_rows, document_rows
from lsts.kernels.attention.documents import document_fields
from lsts.parallel.checks import attention_setup
from lsts.parallel.ring import ring_attention
from lsts.parallel.sharding import check_seq_len, layout_indices
from lsts.parallel.ulysses import (
    check_head_count,
    head_shard_sinks,
    head_shard_span,
    heads_back,
    layout_order,
    scatter_heads,
)

HYBRID_LAYOUTS = ("contiguous", "zigzag")


def _check_hybrid(layout: str, n_heads: int, ulysses_world: int, seq_len: int, world: int) -> None:
    check_seq_len(seq_len, layout, world)
    if layout not in HYBRID_LAYOUTS:
        raise ValueError(
            f"hybrid attention supports the layouts {HYBRID_LAYOUTS}, got {layout!r}: a {layout} shard of the "
            f"whole group is not a {layout} shard of the ring after the Ulysses gather; use zigzag"
        )
    check_head_count(n_heads, ulysses_world, what="hybrid (ulysses part of)")


def check_mesh_order(ring_group: dist.ProcessGroup, ulysses_group: dist.ProcessGroup) -> None:
    """The two groups must be the axes of one mesh in the documented rank order: the global rank of
    (ring r, ulysses u) is ``base + (r·U + u)·s`` for one stride ``s`` (1 unless axes such as tensor
    parallelism sit inside). Any other pairing (ring groups of consecutive ranks, say: yunchang's
    ``use_ulysses_low=False``) would attend the shards in the wrong order: a ValueError instead."""
    uly, ring = dist.get_process_group_ranks(ulysses_group), dist.get_process_group_ranks(ring_group)
    n_uly = len(uly)
    stride = uly[1] - uly[0] if n_uly > 1 else (ring[1] - ring[0] if len(ring) > 1 else 1)
    in_order = all(uly[u] == uly[0] + u * stride for u in range(n_uly))
    in_order = in_order and all(ring[r] == ring[0] + r * n_uly * stride for r in range(len(ring)))
    if stride <= 0 or not in_order:
        raise ValueError(
            f"hybrid attention needs the ring and Ulysses groups of one mesh with the Ulysses axis inner (rank of "
            f"(ring r, ulysses u) = r·U + u): got Ulysses group ranks {uly} and ring group ranks {ring}. Build them "
            f"with a DeviceMesh of axes (ring, ulysses) (pass mesh=), or use lsts.parallel.compat.LongContextAttention "
            f"for yunchang's group layouts"
        )


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_group: dist.ProcessGroup | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    mesh=None,
    span: Span = CAUSAL,
    cu_seqlens: torch.Tensor | list[int] | Documents | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
):
    """Ulysses × ring attention. Pass ``ring_group`` and ``ulysses_group``, or ``mesh``: a 2-D
    DeviceMesh whose axis 0 is the ring and axis 1 the Ulysses group. ``q [B, S_local, H, D]``,
    ``k, v [B, S_local, H_kv, D]`` sharded by ``layout`` over all ``U·R`` ranks; returns
    ``out [B, S_local, H, D]`` (and ``lse [B, H, S_local]`` when ``return_lse``). Any ``H >= U``: the
    heads split over the Ulysses group as in `ulysses_attention`.
    ``span`` and ``cu_seqlens`` as in `ring_attention` (zigzag or contiguous). ``softcap`` and
    ``sinks [H]`` as in `ulysses_attention`: each rank's ``sinks.grad`` holds the part of its heads
    and its ring shard's queries. The groups must be the axes of one mesh in that rank order
    (`check_mesh_order`), or a ValueError says so."""
    rows = document_rows(cu_seqlens, q.shape[0])
    if rows is not None:  # each row its own documents
        kw = dict(ring_group=ring_group, ulysses_group=ulysses_group, mesh=mesh, layout=layout)
        kw.update(softmax_scale=softmax_scale, backend=backend, span=span, softcap=softcap, sinks=sinks)
        return attend_rows(hybrid_attention, rows, q, k, v, with_lse=return_lse, return_lse=True, **kw)
    if mesh is not None:
        if mesh.ndim != 2:
            raise ValueError(f"hybrid attention needs a 2-D mesh (ring, ulysses), got {mesh.ndim} axes")
        ring_group, ulysses_group = mesh.get_group(0), mesh.get_group(1)
    if ring_group is None or ulysses_group is None:
        raise ValueError("hybrid attention needs both ring_group and ulysses_group (or a 2-D mesh)")
    n_uly, n_ring = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)

    def check(w: int) -> None:
        check_mesh_order(ring_group, ulysses_group)
        _check_hybrid(layout, q.shape[2], w, q.shape[1] * n_uly * n_ring, n_uly * n_ring)

    docs = as_documents(cu_seqlens, q.device, q.shape[1] * n_uly * n_ring)
    scale, backend = attention_setup(
        q, k, v, ulysses_group, layout, span, softmax_scale, backend, extra_check=check,
        extra_fields=document_fields(docs), softcap=softcap, sinks=sinks,
    )  # fmt: skip
    world, ring_rank = n_uly * n_ring, dist.get_rank(ring_group)
    seq_len = q.shape[1] * world

    qh, kh, vh = scatter_heads(q, k, v, ulysses_group)
    # Put the gathered tokens (rank by rank) in the order of ring rank r's shard over R ranks.
    gathered = layout_order(seq_len, world, layout, range(ring_rank * n_uly, (ring_rank + 1) * n_uly))
    to_ring = torch.argsort(gathered)
    if not torch.equal(gathered[to_ring], layout_indices(seq_len, n_ring, ring_rank, layout)):
        raise RuntimeError(f"hybrid: the Ulysses group's tokens are not ring rank {ring_rank}'s {layout} shard")
    to_ring, from_ring = to_ring.to(q.device), torch.argsort(to_ring).to(q.device)
    qh, kh, vh = (x[:, to_ring] for x in (qh, kh, vh))
    uly_rank = dist.get_rank(ulysses_group)
    out, lse = ring_attention(
        qh, kh, vh, ring_group, layout=layout, softmax_scale=scale, return_lse=True, backend=backend,
        span=head_shard_span(span, q.shape[2], uly_rank, n_uly), cu_seqlens=docs, softcap=softcap,
        sinks=head_shard_sinks(sinks, uly_rank, n_uly),
    )  # fmt: skip
    return heads_back(out[:, from_ring], lse[:, :, from_ring] if return_lse else None, ulysses_group, q.shape[2])
