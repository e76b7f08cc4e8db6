"""ring-flash-attention's fixed-length functions on lsts' ring attention.

``zigzag_ring_flash_attn_func``, ``ring_flash_attn_func`` and ``stripe_flash_attn_func`` (and their
``_qkvpacked`` / ``_kvpacked`` forms) take this rank's shard ``[B, S_local, H, D]`` exactly as the
peer shards it — zigzag: chunks r and 2P-1-r of 2P; ring: chunk r of P; stripe: tokens r, r+P, ... —
which are lsts' ``zigzag``, ``contiguous`` and ``stripe`` layouts, so they run natively. Positional
order, defaults (``causal=False``) and return values follow the peer: ``out``, or
``(out, lse [B, H, S_local] float32, None)`` with ``return_attn_probs``. Two keywords are added after
``group``: ``softcap`` (FlashAttention 2.6's) and ``backend`` (lsts' kernel choice).
"""

from __future__ import annotations

from lsts.parallel.compat.flash_args import attn_result, check_flash_args, flash_span
from lsts.parallel.ring import ring_attention


def _fixed_length(layout: str, name: str):
    def attn_func(
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        group=None,
        softcap=0.0,
        backend="auto",
    ):
        check_flash_args(dropout_p, alibi_slopes)
        span = flash_span(causal, window_size)
        kw = dict(
            layout=layout, softmax_scale=softmax_scale, return_lse=True, backend=backend, span=span, softcap=softcap
        )
        out, lse = ring_attention(q, k, v, group, **kw)
        return attn_result(out, lse, return_attn_probs)

    attn_func.__name__ = attn_func.__qualname__ = name
    attn_func.__doc__ = (
        f"ring-flash-attention's ``{name}`` on lsts' ring attention with layout {layout!r}: ``q [B, S_local, H, D]``, "
        f"``k, v [B, S_local, H_kv, D]``. ``deterministic`` is accepted: lsts' backward always is."
    )
    return attn_func


def qkvpacked(func, dim: int):
    """The ``_qkvpacked`` form of ``func``: q, k, v stacked along ``dim`` of one tensor."""

    def packed(qkv, *args, **kwargs):
        q, k, v = qkv.unbind(dim)
        return func(q, k, v, *args, **kwargs)

    packed.__name__ = packed.__qualname__ = func.__name__.replace("_func", "_qkvpacked_func")
    packed.__doc__ = f"``{func.__name__}`` with q, k, v stacked along dim {dim} of ``qkv``."
    return packed


def kvpacked(func, dim: int):
    """The ``_kvpacked`` form of ``func``: k, v stacked along ``dim`` of one tensor."""

    def packed(q, kv, *args, **kwargs):
        k, v = kv.unbind(dim)
        return func(q, k, v, *args, **kwargs)

    packed.__name__ = packed.__qualname__ = func.__name__.replace("_func", "_kvpacked_func")
    packed.__doc__ = f"``{func.__name__}`` with k, v stacked along dim {dim} of ``kv``."
    return packed


zigzag_ring_flash_attn_func = _fixed_length("zigzag", "zigzag_ring_flash_attn_func")
ring_flash_attn_func = _fixed_length("contiguous", "ring_flash_attn_func")
stripe_flash_attn_func = _fixed_length("stripe", "stripe_flash_attn_func")
zigzag_ring_flash_attn_qkvpacked_func = qkvpacked(zigzag_ring_flash_attn_func, dim=2)
ring_flash_attn_qkvpacked_func = qkvpacked(ring_flash_attn_func, dim=2)
stripe_flash_attn_qkvpacked_func = qkvpacked(stripe_flash_attn_func, dim=2)
zigzag_ring_flash_attn_kvpacked_func = kvpacked(zigzag_ring_flash_attn_func, dim=2)
ring_flash_attn_kvpacked_func = kvpacked(ring_flash_attn_func, dim=2)
stripe_flash_attn_kvpacked_func = kvpacked(stripe_flash_attn_func, dim=2)
