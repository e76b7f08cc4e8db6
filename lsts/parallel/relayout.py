"""Move token rows between ranks from one sharding of a sequence to another, exactly and
differentiably: how shardings that are not lsts layouts (a peer library's per-document sharding,
say) are brought to one, attended, and taken back.

A sharding is, for every rank, the global positions of its rows in order. `Relayout` plans one
move for this rank from the positions alone (every rank derives every split, so no metadata is
exchanged): each row goes to the rank that holds its position in the target sharding, in one
all-to-all with uneven splits, and lands in the target order. The backward is the reverse
exchange. Cost: one all-to-all of the rows that change rank (most of them, for unrelated
shardings), about what one Ulysses all-to-all of the same tensors moves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


class Relayout:
    """This rank's part of the move from sharding ``src`` to sharding ``dst`` (lists of per-rank
    global positions, int64; together each covers ``0..N-1`` once). `apply` moves tensors along
    their sequence dim; `inverse` is the plan back."""

    def __init__(self, src: list[torch.Tensor], dst: list[torch.Tensor], rank: int):
        self.src, self.dst, self.rank = src, dst, rank
        n = sum(len(p) for p in src)
        owner, slot = _owner_and_slot(dst, n)
        _owner_and_slot(src, n)  # the same check for the source: every position held once
        mine = src[rank]
        # Our rows grouped by destination rank, each group in its destination's order.
        self.send_order = torch.argsort(owner[mine] * n + slot[mine])
        self.send_sizes = torch.bincount(owner[mine], minlength=len(dst)).tolist()
        # From every source rank, its rows that we own, in our order: where each arrival goes.
        arriving = [slot[p][owner[p] == rank].sort().values for p in src]
        self.recv_sizes = [len(a) for a in arriving]
        self.place = torch.argsort(torch.cat(arriving))
        self.identity = all(torch.equal(a, b) for a, b in zip(src, dst))

    def inverse(self) -> Relayout:
        return Relayout(self.dst, self.src, self.rank)

    def apply(self, tensors: list[torch.Tensor], dim: int, group=None) -> list[torch.Tensor]:
        """``tensors`` (the same length along ``dim``; any other shapes and one dtype) moved to
        the target sharding together: one exchange, differentiable."""
        if self.identity:
            return list(tensors)
        rows = [x.movedim(dim, 0) for x in tensors]
        shapes = [r.shape[1:] for r in rows]
        flat = torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
        flat = flat.index_select(0, self.send_order.to(flat.device)).contiguous()
        group = group or dist.group.WORLD
        moved = funcol.all_to_all_single_autograd(flat, self.recv_sizes, self.send_sizes, group)
        moved = funcol.wait_tensor(moved).index_select(0, self.place.to(flat.device))
        widths = [shape.numel() for shape in shapes]
        parts = moved.split(widths, dim=1)
        return [p.reshape(p.shape[0], *shape).movedim(0, dim) for p, shape in zip(parts, shapes)]


def _owner_and_slot(sharding: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every global position: the rank holding it and its index there; ValueError unless each
    of ``0..n-1`` is held exactly once."""
    owner = torch.full((n,), -1, dtype=torch.int64)
    slot = torch.empty(n, dtype=torch.int64)
    in_range = all(len(pos) == 0 or (int(pos.min()) >= 0 and int(pos.max()) < n) for pos in sharding)
    if in_range and sum(len(pos) for pos in sharding) == n:
        for r, pos in enumerate(sharding):
            owner[pos] = r
            slot[pos] = torch.arange(len(pos))
    if bool((owner < 0).any()):  # n rows in range, none missing: each position exactly once
        raise ValueError(f"a sharding must hold every position 0..{n - 1} exactly once")
    return owner, slot


__all__ = ["Relayout"]
