"""Allocation of the buffers a Triton kernel fills itself.

Production allocates them with `torch.empty`: a NaN fill would cost one more full write of every
output. With ``LSTS_POISON_BUFFERS=1`` in the environment when lsts is imported (the test suite sets
it in ``tests/conftest.py``) floating-point buffers start as NaN instead, so an element a kernel
fails to write cannot pass a test unnoticed.
"""

from __future__ import annotations

import os

import torch

POISON = os.environ.get("LSTS_POISON_BUFFERS", "0") == "1"  # read once; tests may flip the attribute


def kernel_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized buffer, NaN-filled when `POISON` is on (floating dtypes)."""
    if POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kernel_buffer_like(t: torch.Tensor) -> torch.Tensor:
    """`kernel_buffer` with the shape, dtype and device of ``t`` (contiguous)."""
    return kernel_buffer(t.shape, t.dtype, t.device)


__all__ = ["POISON", "kernel_buffer", "kernel_buffer_like"]
