"""Learnable attention sinks (gpt-oss) and logit softcapping (Gemma2): argument checks and the sink rule.

A sink is one extra virtual key per query head with logit ``sinks[h]`` and value zero. Applied once
to the *final* ``(out, lse)`` of the queries (all keys merged, whichever method got them):

    lse' = logaddexp(lse, sink);  out' = exp(lse - lse') * out

A query that sees no key gets ``out' = 0`` and ``lse' = sink``. The ordinary flash backward run with
``(dout', out', lse')`` is then exact for q, k and v (the sink's value is zero, so the softmax
Jacobian's row term ``rowsum(dO' * O')`` already includes it), and

    dsinks[h] = -Σ_{b,i} exp(sink[h] - lse'[b,h,i]) * rowsum(dO'[b,i,h] * O'[b,i,h])

Applying a sink per ring step or per key block instead would count it once per block.
"""

from __future__ import annotations

import math
import struct

import torch


def check_softcap_sinks(q: torch.Tensor, softcap, sinks) -> None:
    """ValueError naming ``softcap`` or ``sinks`` when they do not fit the call's queries ``q [B, S, H, D]``."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise ValueError(f"softcap must be a float (0 = off), got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0 = off), got {softcap}")
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a floating-point tensor [query heads] or None, got {type(sinks).__name__}")
    if sinks.dim() != 1 or sinks.shape[0] != q.shape[2]:
        raise ValueError(f"sinks must be 1-D with one logit per query head ({q.shape[2]}), got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")


def softcap_code(softcap: float) -> int:
    """The bits of ``softcap`` as an int64, for the ranks' agreement check."""
    return struct.unpack("<q", struct.pack("<d", float(softcap)))[0]


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out', lse')``: ``out [B, S, H, D]`` (any dtype, kept) and ``lse [B, H, S]`` with each head's sink."""
    sink = sinks.detach().to(lse.dtype)[None, :, None]
    new_lse = torch.logaddexp(lse, sink)
    ref = new_lse.masked_fill(torch.isinf(new_lse), 0.0)  # no key and a -inf sink: out stays 0, not NaN
    weight = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)  # 0 for rows without keys
    return (out.to(lse.dtype) * weight).to(out.dtype), new_lse


def sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``dsinks [H]`` (dtype of ``sinks``) from the sink-applied ``out'`` and ``lse'`` of `add_sinks`."""
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(1, 2)  # [B, H, S]
    p_sink = torch.exp(sinks.detach().to(lse.dtype)[None, :, None] - lse)
    p_sink = p_sink.masked_fill(torch.isinf(lse), 0.0)  # a -inf sink and no key: no gradient, no NaN
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


__all__ = ["add_sinks", "check_softcap_sinks", "sinks_grad", "softcap_code"]
