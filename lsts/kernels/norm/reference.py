"""The ``reference`` backend of RMSNorm (`lsts.kernels.norm`): the formula as written, the tests' oracle."""

from __future__ import annotations

import torch

from lsts.kernels import _utils


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The formula as written; with float64 input every step is float64."""
    acc = _utils.acc_dtype(x.dtype)
    xa = x.to(acc)
    normed = xa / torch.sqrt((xa * xa).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return (normed.to(x.dtype).to(acc) * weight.to(acc)).to(x.dtype)
