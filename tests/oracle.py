"""The oracle of the sequence-parallel tests: explicit softmax attention on the full sequence in
one process, in float64, with every gradient."""

from __future__ import annotations

import torch

from lsts.kernels.attention import reference


def full_attention(q, k, v, dout, causal: bool, scale: float | None = None):
    """Returns ``out, lse, dq, dk, dv`` of explicit attention, all float64."""
    q, k, v, dout = (x.detach().double().requires_grad_() for x in (q, k, v, dout))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = reference.attention_fwd(q, k, v, scale, causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse, dq, dk, dv


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float64)."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
