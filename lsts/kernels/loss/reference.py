"""The ``reference`` backend of the loss (`lsts.kernels.loss`): the full logits and PyTorch's
cross-entropy, differentiated by autograd; the tests' oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsts.kernels import _utils


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None
) -> torch.Tensor:
    """Summed cross-entropy of the full logits (``[N, V]``, accumulation dtype), with autograd."""
    acc = _utils.acc_dtype(hidden.dtype)
    z = hidden.to(acc) @ weight.to(acc).T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
