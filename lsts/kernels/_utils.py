"""Helpers that every kernel module shares."""

from __future__ import annotations

import torch


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every buffer a kernel fills itself. Called through this module, so that the
    tests can swap in a NaN-filled one: an element left unwritten then shows up in the results."""
    return torch.empty(shape, dtype=dtype, device=device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


__all__ = ["acc_dtype", "empty"]
