"""Rotary position embedding (RoPE) at explicit, global position ids, with linear scaling.

Under sequence parallelism a rank holds tokens that are not contiguous positions (a zigzag shard
holds chunks ``r`` and ``2W-1-r``), so the angle of every token comes from its *global* position id,
passed in, never from ``arange(S)``. Rotating a shard with its global positions equals the shard of
the rotated full sequence.

Convention: rotate-half, as Llama in Hugging Face transformers: dim ``i`` pairs with ``i + D/2``,
``inv_freq[i] = base ** (-2i / D)``, and with linear scaling (position interpolation, Chen et al.
2023) the angle is ``(pos / scaling_factor) * inv_freq[i]``. As transformers does it, the factor
divides ``inv_freq`` and the angle is the float32 product ``float(pos) * inv_freq`` — so in float32
this module matches ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` with
``rope_scaling={"rope_type": "linear", "factor": scaling_factor}`` and ``rope_theta=base``
(``scaling_factor=1`` is the default rope type). Then

    y[..., :D/2] = x1 cos - x2 sin,    y[..., D/2:] = x2 cos + x1 sin,

in float32 (float64 for float64 input), returned in ``x.dtype``. The backward is the rotation by the
negative angle; the Triton backward is the forward kernel with the sign of ``sin`` flipped.

Sources: Su et al., "RoFormer" (2021); Chen et al., "Extending Context Window of Large Language
Models via Positional Interpolation" (2023). Limits: for float16/bfloat16 inputs transformers rounds
cos/sin to the input dtype before multiplying while lsts keeps them in float32 (differences of about
one unit in the last place); positions above 2**24 lose integer precision in float32, as in
transformers; the Triton kernels need ``x`` with a unit stride along ``D``, and copy it otherwise.
"""

from __future__ import annotations

import torch

from lsts.kernels.backend import resolve_backend
from lsts.kernels.rope.angles import rope_frequencies
from lsts.kernels.rope.cpu import rope_torch
from lsts.kernels.rope.reference import rope_reference

_SUPPORTED = ("triton", "torch", "reference")


# --- public API -----------------------------------------------------------------------------------


def _check(x: torch.Tensor, positions: torch.Tensor, base: float, scaling_factor: float) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"apply_rope needs a floating-point x [B, S, H, D], got {tuple(x.shape)} {x.dtype}")
    B, S, _, D = x.shape
    if D % 2:
        raise ValueError(f"apply_rope needs an even head_dim to pair dims i and i + D/2, got D = {D}")
    if positions.shape not in ((S,), (B, S)):
        raise ValueError(
            f"apply_rope positions must be [S] = [{S}] or [B, S] = [{B}, {S}] for x {tuple(x.shape)}, "
            f"got {tuple(positions.shape)}"
        )
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"apply_rope positions must be integer position ids (int64), got {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(f"apply_rope positions are on {positions.device} but x on {x.device}; move them to one device")
    if not base > 0.0:
        raise ValueError(f"apply_rope base must be > 0, got {base}")
    if not scaling_factor > 0.0:
        raise ValueError(f"apply_rope scaling_factor must be > 0 (1.0 = no scaling), got {scaling_factor}")


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    base: float = 10000.0,
    scaling_factor: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate ``x [B, S, H, D]`` (queries or keys) at global ``positions [S]`` or ``[B, S]`` (int64).

    Returns ``[B, S, H, D]`` in ``x.dtype``; the angle of pair ``i`` at position ``p`` is
    ``(p / scaling_factor) * base ** (-2i / D)`` (float32). Equals transformers' Llama rotary embedding
    with ``rope_type="linear"`` and ``factor=scaling_factor`` (see the module docstring).
    ``backend``: ``"auto" | "triton" | "torch" | "reference"``. Raises `ValueError` for an odd ``D``,
    positions whose shape is not ``[S]`` / ``[B, S]``, or a non-positive base or factor.
    """
    _check(x, positions, base, scaling_factor)
    impl = resolve_backend(backend, x.device, "apply_rope", supported=_SUPPORTED)
    if impl == "triton":
        inv_freq = rope_frequencies(x.shape[-1], base, x.device) / scaling_factor
        from lsts.kernels.rope.triton import RopeFunction  # triton is imported only when its kernel runs

        return RopeFunction.apply(x, positions.expand(x.shape[0], x.shape[1]), inv_freq)
    if impl == "torch":
        return rope_torch(x, positions, base, scaling_factor)
    return rope_reference(x, positions, base, scaling_factor)
