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

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, eq=False)
class Documents:
    """Per-position document bounds ``start``, ``end`` (int32 ``[N]``, on the kernels' device) of
    one packed sequence, and its boundaries ``cu`` (int64, on the host) for the host-side planning
    of tiles and chunks, which must not wait on the device."""

    start: torch.Tensor
    end: torch.Tensor
    cu: torch.Tensor
    # A batch whose rows have their own documents runs one call per distinct row documents
    # (`attend_rows`): (rows, calls) of that batch, which every rank must agree on before the
    # first call; (0, 0) when every row shares these documents.
    row_plan: tuple[int, int] = (0, 0)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor | list[int], device=None) -> Documents:
        """Validate ``cu_seqlens`` (starts at 0, strictly increasing) and expand it per position."""
        cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
        if cu.dim() != 1 or len(cu) < 2:
            raise ValueError(f"cu_seqlens must be 1-D [n_docs + 1] (or one per batch row), got shape {tuple(cu.shape)}")
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
        return replace(self, start=self.start.to(device), end=self.end.to(device))

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


def document_rows(cu_seqlens, batch: int) -> list[tuple[int, ...]] | None:
    """The boundaries of each batch row when ``cu_seqlens`` gives one list per row (a 2-D tensor
    ``[B, n + 1]`` or a list of per-row lists, which may differ in length); None when one list is
    shared by every row."""
    if cu_seqlens is None or isinstance(cu_seqlens, Documents):
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 2:
            return None
        rows = [tuple(row) for row in cu_seqlens.tolist()]
    elif len(cu_seqlens) and isinstance(cu_seqlens[0], list | tuple | torch.Tensor):
        rows = [tuple(torch.as_tensor(row).tolist()) for row in cu_seqlens]
    else:
        return None
    if len(rows) != batch:
        raise ValueError(
            f"cu_seqlens has {len(rows)} rows of boundaries but the batch has {batch} rows; give one per row"
        )
    return rows


def attend_rows(fn: Callable, rows: list[tuple[int, ...]], q, k, v, with_lse: bool, **kwargs):
    """Attention of a batch whose rows have their own documents: ``fn(q, k, v, cu_seqlens=docs,
    **kwargs) -> (out, lse)`` once per distinct row documents (rows that share them run as one
    batch), and the rows put back in order; ``(out, lse)`` or ``out`` as ``with_lse`` says. Rows are
    picked and put back with ``index_select``, so gradients flow to every row."""
    calls: dict[tuple[int, ...], list[int]] = {}
    for b, row in enumerate(rows):
        calls.setdefault(row, []).append(b)
    plan = (len(rows), len(calls)) if len(calls) > 1 else (0, 0)
    outs, lses = [], []
    for row, picked in calls.items():
        index = torch.tensor(picked, device=q.device)
        docs = replace(Documents.from_cu_seqlens(list(row)), row_plan=plan)
        out, lse = fn(*(x.index_select(0, index) for x in (q, k, v)), cu_seqlens=docs, **kwargs)
        outs.append(out)
        lses.append(lse)
    back = torch.argsort(torch.tensor([b for picked in calls.values() for b in picked], device=q.device))
    out, lse = torch.cat(outs).index_select(0, back), torch.cat(lses).index_select(0, back)
    return (out, lse) if with_lse else out


def document_fields(docs: Documents | None) -> dict[str, int]:
    """What every rank must agree on about the packed documents: their count, a checksum, and for a
    batch whose rows have their own documents, its rows and calls (the same keys in every case)."""
    if docs is None:
        return {"packed documents": 0, "document boundary checksum": 0, "rows with own documents": 0, "row calls": 0}
    weights = torch.arange(1, len(docs.cu) + 1)
    return {
        "packed documents": len(docs.cu) - 1,
        "document boundary checksum": int((docs.cu * weights).sum() % 2**31),
        "rows with own documents": docs.row_plan[0],
        "row calls": docs.row_plan[1],
    }
