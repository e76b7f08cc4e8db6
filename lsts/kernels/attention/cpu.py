"""Fused CPU attention: PyTorch's flash-attention CPU kernel, which returns the log-sum-exp.

``aten._scaled_dot_product_flash_attention_for_cpu`` is a private op (linear memory, ~150 GFLOP/s on
two cores in fp32). This module is the only place that calls it, so a change of its signature breaks
here and in ``tests/test_local_attention.py``, nowhere else. The op takes [B, H, S, D]; we pass
transposed views of our [B, S, H, D] tensors (no copy) and it handles GQA natively. Its backward
accepts an external ``out`` and ``lse``, which makes it an exact key-partition backward for ring steps.
"""

from __future__ import annotations

import torch

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Sq, H, D]``, ``k, v [B, Sk, H_kv, D]`` -> ``out [B, Sq, H, D]``, ``lse [B, H, Sq]``."""
    out, lse = _fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=softmax_scale)
    return out.transpose(1, 2), lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``q`` and for the keys ``k, v`` given the queries' global ``out`` and ``lse``."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - BSHD <-> BHSD view
    dq, dk, dv = _bwd(t(dout), t(q), t(k), t(v), t(out), lse, 0.0, causal, scale=softmax_scale)
    return t(dq), t(dk), t(dv)
