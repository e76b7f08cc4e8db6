"""The ``torch`` backend of RoPE (`lsts.kernels.rope`): PyTorch ops, differentiated by autograd; the
CPU twin of the Triton kernel (and usable on any device)."""

from __future__ import annotations

import torch

from lsts.kernels.rope.angles import per_token, rope_angles


def rope_torch(
    x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, scaling_factor: float = 1.0
) -> torch.Tensor:
    """PyTorch ops, differentiated by autograd; rotation in float32 (float64 for float64 input)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    angles = rope_angles(positions, x.shape[-1], base, scaling_factor).to(acc)
    cos, sin = per_token(angles.cos()), per_token(angles.sin())
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
