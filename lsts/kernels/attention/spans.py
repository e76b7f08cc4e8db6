"""Attention spans: which keys each query may see, as one predicate in *global* positions.

A span is the mask of a layer (``docs/algorithms.md`` §5-§7). With query position i, key position j,
query head h of H, every span is the conjunction

    causal:  j <= i                                   (every span here but "full")
    window:  i - j < w                                ("window": the previous w keys, itself included)
    group:   (i + s_h) // G == (j + s_h) // G  or  j < n_sink
                                                      ("block": G = b, s_h = 0;
                                                       "s2" / "sf": G = group, s_h = G/2 on the second
                                                       half of the heads, n_sink sinks for "sf")

"s2" is LongLoRA's leak-free shifted grouping (the authors' default training path: shifted heads
use segments [0, G/2), [G/2, 3G/2), ...; no wrap-around). "sf" is SinkLoRA's SF-Attn: the same
groups plus global attention to the first ``n_sink`` tokens. Positions are global so that a ring
step (or any block of a sharded sequence) evaluates the same mask with ``q_offset`` / ``k_offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPAN_KINDS = ("full", "causal", "window", "block", "s2", "sf")


@dataclass(frozen=True)
class Span:
    """``kind`` in `SPAN_KINDS`; ``size`` is the window w, the block b or the group G; ``n_sink`` the
    number of sink tokens (``"sf"`` only; SinkLoRA uses 4). ``shift_from`` places the boundary of
    the shifted heads in a call that holds a slice of a layer's heads (Ulysses): heads from it on are
    shifted; by default the second half of the call's heads are."""

    kind: str = "causal"
    size: int = 0
    n_sink: int = 0
    shift_from: int | None = None  # s2/sf: the first shifted head of a call; None = half of its heads

    def __post_init__(self) -> None:
        if self.kind not in SPAN_KINDS:
            raise ValueError(f"unknown attention span {self.kind!r}; choose one of {SPAN_KINDS}")
        if self.kind in ("window", "block", "s2", "sf") and self.size <= 0:
            raise ValueError(f"span {self.kind!r} needs a positive size (window / block / group), got {self.size}")
        if self.kind in ("s2", "sf") and self.size % 2:
            raise ValueError(f"span {self.kind!r} shifts groups by half: the group size must be even, got {self.size}")
        if self.n_sink and self.kind != "sf":
            raise ValueError(f"sink tokens belong to the 'sf' span, not {self.kind!r}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.shift_from is not None and (not self.shifts_heads or self.shift_from < 0):
            raise ValueError(f"shift_from ({self.shift_from}) applies to 's2' / 'sf' spans only and must be >= 0")

    @property
    def causal(self) -> bool:
        return self.kind != "full"

    @property
    def window(self) -> int:
        return self.size if self.kind == "window" else 0

    @property
    def group(self) -> int:
        return self.size if self.kind in ("block", "s2", "sf") else 0

    @property
    def shifts_heads(self) -> bool:
        """True when the second half of the heads use groups shifted by G/2."""
        return self.kind in ("s2", "sf")

    def first_shifted(self, n_heads: int) -> int:
        """Index of the first shifted head of a call with ``n_heads`` heads (``n_heads``: none)."""
        if not self.shifts_heads:
            return n_heads
        return n_heads // 2 if self.shift_from is None else min(self.shift_from, n_heads)

    def shift(self, head: int, n_heads: int) -> int:
        return self.size // 2 if head >= self.first_shifted(n_heads) else 0

    def shifts(self, n_heads: int | None = None) -> set[int]:
        """The group shifts of a call's heads (every shift some head may have when ``n_heads`` is not
        given), for planning which keys a block can reach."""
        if not self.shifts_heads:
            return {0}
        if n_heads is None:
            return {0, self.size // 2}
        return {self.shift(h, n_heads) for h in range(n_heads)}

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, n_heads: int = 1) -> torch.Tensor:
        """Boolean keep-mask ``[H, Sq, Sk]`` (``H`` is 1 unless the span shifts heads)."""
        i, j = q_pos[:, None], k_pos[None, :]
        keep = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
        if self.causal:
            keep = keep & (j <= i)
        if self.window:
            keep = keep & (i - j < self.window)
        if not self.group:
            return keep[None]
        masks = []
        for h in range(n_heads if self.shifts_heads else 1):
            s = self.shift(h, n_heads)
            in_group = (i + s) // self.group == (j + s) // self.group
            masks.append(keep & (in_group | (j < self.n_sink)))
        return torch.stack(masks)

    def key_range(self, q_first: int, q_last: int, shift: int = 0) -> tuple[int, int]:
        """Global key positions ``[lo, hi)`` that queries ``q_first..q_last`` may see, sinks aside."""
        lo, hi = 0, q_last + 1 if self.causal else None
        if self.window:
            lo = max(lo, q_first - self.window + 1)
        if self.group:
            g = self.group
            lo = max(lo, (q_first + shift) // g * g - shift)
            hi = min(hi, ((q_last + shift) // g + 1) * g - shift)
        return lo, hi
