"""The ``torch`` backend's per-chunk step of the chunked loss (`lsts.kernels.loss`): PyTorch ops in
place on the chunk's logits; the CPU twin of `lsts.kernels.loss.triton.ce_chunk`."""

from __future__ import annotations

import torch


def ce_chunk(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None) -> torch.Tensor:
    """Same contract as `lsts.kernels.loss.triton.ce_chunk`, in PyTorch ops that work in place on ``z``, so a chunk
    costs one ``[C, V]`` buffer (two with ``softcap``: tanh is needed again for the chain rule)."""
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).unsqueeze(1)  # [C, 1]
    tanh = None
    if softcap is not None:
        tanh = z.div(softcap).tanh_()
        torch.mul(tanh, softcap, out=z)
    z_y = z.gather(1, y).squeeze(1)
    z_max = z.amax(1, keepdim=True)
    z.sub_(z_max).exp_()
    sum_exp = z.sum(1, keepdim=True)
    z.div_(sum_exp)  # softmax
    lse = (z_max + sum_exp.log()).squeeze(1)
    z.scatter_add_(1, y, torch.full_like(z_y, -1.0).unsqueeze(1))  # minus the one-hot
    if tanh is not None:
        z.mul_(tanh.square_().neg_().add_(1.0))  # d(softcap * tanh(z / softcap))/dz = 1 - tanh²
    z.masked_fill_(~valid.unsqueeze(1), 0.0)
    return torch.where(valid, lse - z_y, 0.0)
