"""Which implementation of a kernel runs: chosen by an argument (from the config), never by an
environment variable read inside ``forward``.

- ``"triton"``: fused Triton kernels; CUDA tensors, or CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before lsts is imported: the tests do this on machines without CUDA).
- ``"torch"``: PyTorch ops (fused aten kernels where they exist, chunked or blockwise otherwise):
  the CPU path of every op.
- ``"reference"``: plain, float64-capable PyTorch; the oracle of the tests.
- ``"auto"``: ``"triton"`` on CUDA where the op has a Triton kernel, ``"torch"`` otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for annotations: lsts.config reads BACKENDS before torch is imported
    import torch

# The kernel backends, the one list of them: lsts.config's choices derive from it.
BACKENDS = ("auto", "triton", "torch", "reference")


def triton_interpreting() -> bool:
    """True when Triton kernels were defined for the CPU interpreter (read once, at import time)."""
    return _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device, op: str, supported: tuple[str, ...] = BACKENDS) -> str:
    """Map ``backend`` to the concrete implementation that runs ``op`` on ``device``.

    ``supported`` lists the backends ``op`` has (``"auto"`` is always accepted). Raises `ValueError`
    naming the op, the backend and the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown {op} backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and "triton" in supported and HAS_TRITON:
            return "triton"
        return "torch" if "torch" in supported else "reference"
    if backend not in supported:
        raise ValueError(f"{op} has no {backend!r} backend; choose one of {supported}")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{op} backend 'triton' needs the triton package; pip install triton, or use 'torch'")
        if device.type != "cuda" and not _INTERPRET:
            raise ValueError(
                f"{op} backend 'triton' needs CUDA tensors, got {device}; use 'torch' on CPU "
                f"(or set TRITON_INTERPRET=1 before importing lsts to run the kernels in Triton's interpreter)"
            )
    return backend
