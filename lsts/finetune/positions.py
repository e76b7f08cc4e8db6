"""Position interpolation for a longer context, written into a transformers config.

transformers 5 keeps RoPE's settings in ``config.rope_parameters``: one dict, or one per layer type
(Gemma3: ``{"full_attention": {...}, "sliding_attention": {...}}``), each with its ``rope_type``,
``rope_theta`` and possibly ``partial_rotary_factor`` and scaling keys. Linear interpolation by an
integer factor ``f = ceil(target / max_position_embeddings)`` divides every rotary frequency by
``f``; it is written as:

- ``default`` RoPE -> ``linear`` with ``factor = f``;
- ``linear`` with factor ``g`` -> ``linear`` with ``g * f`` (interpolating interpolated positions);
- a config class that accepts only ``default`` and ``longrope`` (Phi3) gets the same interpolation
  as ``longrope`` with every short and long factor equal to ``f`` and ``attention_factor = 1``
  (frequencies divided by ``f``, cos/sin unscaled), and such a uniform ``longrope`` extends again;
- any other type (``llama3``, ``yarn``, ``dynamic``, a real ``longrope``, ...) rescales frequencies
  unevenly, and dividing them all by ``f`` is no setting of that type: a ValueError names it.

Every other key is kept as it is. A per-layer-type dict of sliding-window layers whose window fits
the original length is left alone: RoPE depends only on the distance between query and key, and
those layers never see a distance beyond the window. A model without RoPE (GPT-2's learned
positions) cannot be interpolated: fine below its ``max_position_embeddings``, a ValueError above.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

SLIDING_LAYER_TYPES = ("sliding_attention",)


def interpolation_factor(seq_len: int, original: int) -> int:
    """Position interpolation: ``ceil(target / original)``, at least 1."""
    return max(1, math.ceil(seq_len / original))


def _rope_dicts(config: PreTrainedConfig, original: int) -> list[dict]:
    """The RoPE parameter dicts whose frequencies the interpolation rescales."""
    rope = config.rope_parameters
    nested = config.nested_rope_parameter_keys(rope)
    if not nested:
        return [rope]
    window = getattr(config, "sliding_window", None)
    keep = SLIDING_LAYER_TYPES if window is not None and window <= original else ()
    return [rope[t] for t in nested if rope[t] is not None and t not in keep]  # None: a layer type without RoPE


def _uniform_factor(params: dict) -> float | None:
    """The factor by which ``params`` divide every rotary frequency; None if they rescale unevenly."""
    kind = params.get("rope_type", "default")
    if kind == "default":
        return 1.0
    if kind == "linear":
        return float(params["factor"])
    factors = {*params.get("short_factor", ()), *params.get("long_factor", ())}
    if kind == "longrope" and len(factors) == 1 and params.get("attention_factor") == 1.0:
        return float(factors.pop())
    return None


def _as_uniform_longrope(config: PreTrainedConfig, params: dict, factor: float, original: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2  # one factor per rotated pair
    params.pop("factor", None)  # longrope's `factor` only sets its attention factor, given here
    params.update(rope_type="longrope", short_factor=[factor] * n, long_factor=[factor] * n, attention_factor=1.0)
    params.setdefault("original_max_position_embeddings", original)


def extend_positions(config: PreTrainedConfig, seq_len: int) -> int:
    """Write linear position interpolation for ``seq_len`` into ``config`` (in place) and return the
    factor (1: the config already covers ``seq_len`` and is unchanged). ValueError, before any
    change, where RoPE cannot be extended this way."""
    original = config.max_position_embeddings
    factor = interpolation_factor(seq_len, original)
    if factor == 1:
        return 1
    if not getattr(config, "rope_parameters", None):
        raise ValueError(
            f"model type {config.model_type!r} has no rotary position embedding (learned absolute positions, "
            f"{original} of them), so position interpolation cannot extend it to {seq_len} tokens; "
            f"fine-tune at a sequence length of at most {original}"
        )
    dicts = _rope_dicts(config, original)
    for params in dicts:
        if _uniform_factor(params) is None:
            raise ValueError(
                f"model type {config.model_type!r}: its rope_type {params['rope_type']!r} already rescales positions "
                "unevenly, and linear interpolation on top of it is not implemented; fine-tune at a sequence length "
                f"of at most max_position_embeddings = {original}, or raise that type's own factor (and "
                "max_position_embeddings) in the checkpoint's config.json"
            )
    factors = [_uniform_factor(params) * factor for params in dicts]
    for params, new in zip(dicts, factors):
        if params["rope_type"] == "longrope":
            _as_uniform_longrope(config, params, new, original)
        else:
            params.update(rope_type="linear", factor=new)
    config.max_position_embeddings = seq_len
    try:
        config.validate_rope()
    except ValueError:  # the config class refuses `linear` (Phi3): the same frequencies as longrope
        for params, new in zip(dicts, factors):
            _as_uniform_longrope(config, params, new, original)
        config.validate_rope()
    return factor


__all__ = ["extend_positions", "interpolation_factor"]
