"""The rotation angles of RoPE (`lsts.kernels.rope`), rounded as transformers rounds them; shared by
every backend, so that they agree on the convention and differ only in how they rotate."""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, base: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """``inv_freq [head_dim / 2]`` (float32): ``base ** (-2i / head_dim)``, computed as transformers does."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope head_dim must be even and >= 2, got {head_dim}")
    if not base > 0.0:
        raise ValueError(f"rope base must be > 0, got {base}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / head_dim
    return 1.0 / (base**exponents)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float, scaling_factor: float) -> torch.Tensor:
    """``positions [...]`` -> angles ``[..., head_dim / 2]`` in float32, rounded as transformers rounds them."""
    inv_freq = rope_frequencies(head_dim, base, positions.device) / scaling_factor
    return positions.to(torch.float32)[..., None] * inv_freq


def per_token(t: torch.Tensor) -> torch.Tensor:
    """``[S, F]`` or ``[B, S, F]`` -> broadcastable against ``[B, S, H, F]``."""
    return t[:, None, :] if t.dim() == 2 else t[:, :, None, :]
