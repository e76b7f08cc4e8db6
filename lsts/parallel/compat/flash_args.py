"""FlashAttention's keyword arguments, as ring-flash-attention and yunchang pass them on, in lsts
terms: which span a ``(causal, window_size)`` pair means, and a clear error for each argument lsts
cannot honour (never a silently ignored one); ``softcap`` passes through unchanged."""

from __future__ import annotations

from lsts.kernels.attention import CAUSAL, FULL, Span


def flash_span(causal: bool, window_size) -> Span:
    """The lsts span of FlashAttention's ``causal`` and ``window_size = (left, right)``: query i
    sees keys ``i - left .. i + right`` (-1: unbounded on that side), and ``causal`` sets ``right``
    to 0. So ``(w, 0)`` is the causal window of ``w + 1`` keys including the query itself, with or
    without ``causal``; windows that reach later keys are not lsts spans."""
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    if left < 0 and right < 0:
        return FULL
    if right == 0:
        return CAUSAL if left < 0 else Span("window", left + 1)
    raise ValueError(
        f"window_size={tuple(window_size)} with causal={causal} lets queries see later keys, which lsts spans do "
        f"not; supported: (-1, -1), and (left, 0) or causal=True (a causal window of left + 1 keys)"
    )


def check_flash_args(dropout_p: float, alibi_slopes) -> None:
    """ValueError for the FlashAttention arguments lsts does not implement. ``deterministic`` needs
    no check: lsts' kernels have no atomics, so every backward is deterministic. ``softcap`` needs
    none here: lsts applies it as FlashAttention does (``softcap * tanh(scale * q·k / softcap)``,
    before the mask) and its attention calls check the value."""
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: lsts attention has no attention dropout; pass dropout_p=0.0")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: lsts attention has no ALiBi bias; pass alibi_slopes=None (use RoPE positions)")


def attn_result(out, lse, return_attn_probs: bool):
    """The peers' return convention: ``out``, or ``(out, softmax_lse, None)`` when
    ``return_attn_probs`` (FlashAttention's third value, the dropout mask, is None without dropout;
    lsts never materializes the probabilities)."""
    return (out, lse, None) if return_attn_probs else out
