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
import triton
import triton.language as tl

from lsts.kernels.backend import resolve_backend
from lsts.kernels.buffers import kernel_buffer

_SUPPORTED = ("triton", "torch", "reference")


def rope_frequencies(head_dim: int, base: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """``inv_freq [head_dim / 2]`` (float32): ``base ** (-2i / head_dim)``, computed as transformers does."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope head_dim must be even and >= 2, got {head_dim}")
    if not base > 0.0:
        raise ValueError(f"rope base must be > 0, got {base}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / head_dim
    return 1.0 / (base**exponents)


def _angles(positions: torch.Tensor, head_dim: int, base: float, scaling_factor: float) -> torch.Tensor:
    """``positions [...]`` -> angles ``[..., head_dim / 2]`` in float32, rounded as transformers rounds them."""
    inv_freq = rope_frequencies(head_dim, base, positions.device) / scaling_factor
    return positions.to(torch.float32)[..., None] * inv_freq


# --- Triton kernel --------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(
    x, pos, inv_freq, y,
    stride_xb, stride_xs, stride_xh, stride_yb, stride_ys, stride_yh, stride_pb, stride_ps,
    S, H, HALF,
    SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    # One program per (token, block of heads): cos / sin are computed once and shared by the heads.
    i_bs, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_b, i_s = i_bs // S, i_bs % S
    o_f = tl.arange(0, BLOCK_F)
    m_f = o_f < HALF
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H

    b_pos = tl.load(pos + i_b * stride_pb + i_s * stride_ps).to(tl.float32)
    b_inv = tl.load(inv_freq + o_f, mask=m_f, other=0.0)  # [BLOCK_F]
    b_ang = b_pos * b_inv  # [BLOCK_F]
    b_cos = tl.cos(b_ang)  # [BLOCK_F]
    b_sin = SIGN * tl.sin(b_ang)  # [BLOCK_F]; SIGN = -1 rotates back (the backward)

    m_hf = m_h[:, None] & m_f[None, :]
    p_x1 = x + i_b * stride_xb + i_s * stride_xs + o_h[:, None] * stride_xh + o_f[None, :]  # [BLOCK_H, BLOCK_F]
    b_x1 = tl.load(p_x1, mask=m_hf, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_F]
    b_x2 = tl.load(p_x1 + HALF, mask=m_hf, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_F]
    b_y1 = b_x1 * b_cos[None, :] - b_x2 * b_sin[None, :]
    b_y2 = b_x2 * b_cos[None, :] + b_x1 * b_sin[None, :]

    p_y1 = y + i_b * stride_yb + i_s * stride_ys + o_h[:, None] * stride_yh + o_f[None, :]  # [BLOCK_H, BLOCK_F]
    tl.store(p_y1, b_y1.to(y.dtype.element_ty), mask=m_hf)
    tl.store(p_y1 + HALF, b_y2.to(y.dtype.element_ty), mask=m_hf)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """Triton launcher: ``x [B, S, H, D]`` rotated by ``sign * positions [B, S] * inv_freq [D / 2]``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, S, H, D = x.shape
    y = kernel_buffer((B, S, H, D), x.dtype, x.device)
    if y.numel() == 0:
        return y
    block_f = triton.next_power_of_2(D // 2)
    # Bound the [BLOCK_H, BLOCK_F] tile (registers on a GPU); more heads get more programs.
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // block_f))
    grid = (B * S, triton.cdiv(H, block_h))
    _rope_kernel[grid](
        x, positions, inv_freq, y,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        positions.stride(0), positions.stride(1),
        S, H, D // 2,
        SIGN=float(sign), BLOCK_H=block_h, BLOCK_F=block_f,
    )  # fmt: skip
    return y


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(positions, inv_freq)
        return rope_rotate(x, positions, inv_freq, sign=1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        positions, inv_freq = ctx.saved_tensors
        # A rotation's transpose is the rotation by the negative angle: nothing of x is needed.
        return rope_rotate(dy, positions, inv_freq, sign=-1), None, None


# --- PyTorch backends -----------------------------------------------------------------------------


def _per_token(t: torch.Tensor) -> torch.Tensor:
    """``[S, F]`` or ``[B, S, F]`` -> broadcastable against ``[B, S, H, F]``."""
    return t[:, None, :] if t.dim() == 2 else t[:, :, None, :]


def rope_torch(
    x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, scaling_factor: float = 1.0
) -> torch.Tensor:
    """PyTorch ops, differentiated by autograd; rotation in float32 (float64 for float64 input)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    angles = _angles(positions, x.shape[-1], base, scaling_factor).to(acc)
    cos, sin = _per_token(angles.cos()), _per_token(angles.sin())
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_reference(
    x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, scaling_factor: float = 1.0
) -> torch.Tensor:
    """The oracle, written another way: the pair ``(x_i, x_{i+D/2})`` is the complex number
    ``x_i + j x_{i+D/2}``, multiplied by ``exp(j angle_i)``; complex128 for float64 input."""
    acc = torch.promote_types(x.dtype, torch.float32)
    angles = _per_token(_angles(positions, x.shape[-1], base, scaling_factor).to(acc))
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    z = torch.complex(x1, x2) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


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
        return _RopeFunction.apply(x, positions.expand(x.shape[0], x.shape[1]), inv_freq)
    if impl == "torch":
        return rope_torch(x, positions, base, scaling_factor)
    return rope_reference(x, positions, base, scaling_factor)
