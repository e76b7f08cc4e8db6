"""Packed documents (varlen): attention stays inside each document of a packed sequence.

A training sequence packs several documents end to end; ``cu_seqlens = [0, n_0, n_0 + n_1, ..., N]``
(the FlashAttention varlen convention) marks their boundaries in *global* positions. Query ``i``
may see key ``j`` only when both lie in one document, on top of the span's own rule:

    start[i] <= j < end[i]      with [start[p], end[p]) the document of position p

`Documents` keeps ``start`` and ``end`` for every global position (int32, 8 bytes a token), so a
kernel reads the bounds of any query or key block with one load, and a sharded sequence (ring
step, zigzag half) evaluates the same rule at its global offsets. Sinks of the ``"sf"`` span only
reach queries of the first document: the document rule applies to every span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Documents:
    """Per-position document bounds ``start``, ``end`` (int32 ``[N]``, on the kernels' device) of
    one packed sequence, and its boundaries ``cu`` (int64, on the host) for the host-side planning
    of tiles and chunks, which must not wait on the device."""

    start: torch.Tensor
    end: torch.Tensor
    cu: torch.Tensor

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor | list[int], device=None) -> Documents:
        """Validate ``cu_seqlens`` (starts at 0, strictly increasing) and expand it per position."""
        cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
        if cu.dim() != 1 or len(cu) < 2:
            raise ValueError(f"cu_seqlens must be 1-D [n_docs + 1], got shape {tuple(cu.shape)}")
        if cu[0] != 0 or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0 and strictly increase, got {cu.tolist()[:8]}...")
        lengths = cu[1:] - cu[:-1]
        start = torch.repeat_interleave(cu[:-1], lengths).to(torch.int32)
        end = torch.repeat_interleave(cu[1:], lengths).to(torch.int32)
        return cls(start.to(device), end.to(device), cu)

    @property
    def seq_len(self) -> int:
        """The global length ``N`` the boundaries cover."""
        return self.start.numel()

    def to(self, device) -> Documents:
        if self.start.device == torch.device(device):
            return self
        return Documents(self.start.to(device), self.end.to(device), self.cu)

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean ``[Sq, Sk]``: key in the query's document."""
        lo, hi = self.start.to(q_pos.device)[q_pos], self.end.to(q_pos.device)[q_pos]
        return (k_pos[None, :] >= lo[:, None]) & (k_pos[None, :] < hi[:, None])

    def bounds(self, first: int, last: int) -> tuple[int, int]:
        """``[lo, hi)``: the keys that queries ``first..last`` may see (documents only) or, the rule
        being symmetric, the queries that may see keys ``first..last``. Positions are global."""
        d_first = int(torch.searchsorted(self.cu, first, right=True)) - 1
        d_last = int(torch.searchsorted(self.cu, last, right=True)) - 1
        return int(self.cu[d_first]), int(self.cu[d_last + 1])
