"""The ``torch`` backend of RMSNorm (`lsts.kernels.norm`): PyTorch ops, differentiated by autograd;
the CPU twin of the Triton kernel (and usable on any device)."""

from __future__ import annotations

import torch

from lsts.kernels import _utils


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch ops, differentiated by autograd; statistic in float32 (float64 for float64 input)."""
    xa = x.to(_utils.acc_dtype(x.dtype))
    rstd = torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps)
    return ((xa * rstd).to(x.dtype) * weight).to(x.dtype)
