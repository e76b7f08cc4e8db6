"""The ``reference`` backend of RoPE (`lsts.kernels.rope`): rotation as complex multiplication, the
tests' oracle."""

from __future__ import annotations

import torch

from lsts.kernels.rope.angles import per_token, rope_angles


def rope_reference(
    x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, scaling_factor: float = 1.0
) -> torch.Tensor:
    """The oracle, written another way: the pair ``(x_i, x_{i+D/2})`` is the complex number
    ``x_i + j x_{i+D/2}``, multiplied by ``exp(j angle_i)``; complex128 for float64 input."""
    acc = torch.promote_types(x.dtype, torch.float32)
    angles = per_token(rope_angles(positions, x.shape[-1], base, scaling_factor).to(acc))
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    z = torch.complex(x1, x2) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)
