"""Helpers that every kernel module shares."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


__all__ = ["acc_dtype"]
