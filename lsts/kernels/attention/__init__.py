"""Local attention that returns ``(out, lse)``: the one primitive every attention path is built on.

Backends (see `lsts.kernels.backend`):

- ``"torch"``: PyTorch's fused flash-attention CPU kernel (``cpu.py``): linear memory, CPU tensors.
- ``"reference"``: materialized scores in pure PyTorch (``reference.py``): any device, float64, any
  mask; the oracle of the tests.
- ``"auto"``: ``"torch"`` for CPU tensors; ``"reference"`` on CUDA until the Triton backend lands.

Layout: ``q [B, Sq, H, D]``, ``k, v [B, Sk, H_kv, D]`` with ``H % H_kv == 0`` (GQA);
``lse [B, H, Sq]`` in float32 (float64 for float64 inputs). ``causal`` is the top-left aligned
lower triangle, as ``is_causal`` in PyTorch SDPA.
"""

from __future__ import annotations

import math

import torch

from lsts.kernels.attention import cpu, reference
from lsts.kernels.attention.merge import merge_into
from lsts.kernels.backend import resolve_backend as _resolve

__all__ = ["attention", "attention_bwd", "attention_fwd", "merge_into", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete attention backend for ``device`` (`lsts.kernels.backend.resolve_backend`)."""
    if backend == "auto" and device.type != "cpu":
        return "reference"
    resolved = _resolve(backend, device, "attention", supported=("torch", "reference"))
    if resolved == "torch" and device.type != "cpu":
        raise ValueError(f"attention backend 'torch' runs on CPU tensors, got device {device}; use 'reference'")
    return resolved


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def attention_fwd(q, k, v, softmax_scale: float, causal: bool, backend: str):
    """Forward of one block: ``(out [B, Sq, H, D], lse [B, H, Sq])``. ``backend`` must be resolved."""
    if backend == "torch":
        return cpu.attention_fwd(q, k, v, softmax_scale, causal)
    return reference.attention_fwd(q, k, v, softmax_scale, causal)


def attention_bwd(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, backend: str):
    """Backward of one block given the queries' *global* ``out`` and ``lse``: ``(dq, dk, dv)``."""
    if backend == "torch":
        return cpu.attention_bwd(dout, q, k, v, out, lse, softmax_scale, causal)
    return reference.attention_bwd(dout, q, k, v, out, lse, softmax_scale, causal)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, backend):
        out, lse = attention_fwd(q, k, v, softmax_scale, causal, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (softmax_scale, causal, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape, dtype and device agreement of one rank's q, k, v; ValueError naming what is wrong."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) for GQA")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable local attention: ``(out [B, Sq, H, D], lse [B, H, Sq])``; ``lse`` carries no
    gradient. Causal attention needs ``Sq == Sk`` here (ring steps use offsets via tiles)."""
    check_qkv(q, k, v)
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal local attention needs as many queries as keys; got {q.shape[1]} and {k.shape[1]}")
    backend = resolve_backend(backend, q.device)
    return _LocalAttention.apply(q, k, v, default_scale(q.shape[-1], softmax_scale), causal, backend)
