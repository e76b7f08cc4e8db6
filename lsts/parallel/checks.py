"""Start-up validation shared by every sequence-parallel attention: checks run on every rank and
agree before any data collective, so bad input is a `ValueError` on all ranks (never a hang, never a
silently wrong result). The agreement is one small all-gather per call, or, inside a training step,
the step's own (`lsts.parallel.agreement`: no collective per call)."""

from __future__ import annotations

import torch.distributed as dist

from lsts.kernels.attention import check_qkv, check_softcap_sinks, default_scale, resolve_backend
from lsts.kernels.attention.sinks import softcap_code
from lsts.kernels.attention.spans import SPAN_KINDS
from lsts.parallel.agreement import check_call
from lsts.parallel.comm import decode_dtype, encode_dtype
from lsts.parallel.sharding import LAYOUTS, check_layout, check_seq_len


def group_world(group) -> int:
    if not dist.is_initialized():
        raise ValueError("sequence-parallel attention needs torch.distributed to be initialized")
    return dist.get_world_size(group)


def attention_setup(
    q, k, v, group, layout, span, softmax_scale, backend, extra_check=None, extra_fields=None, softcap=0.0,
    sinks=None,
):  # fmt: skip
    """Validate one sequence-parallel attention call on every rank of ``group``; returns the
    resolved ``(softmax_scale, backend)``. ``span`` is the call's `Span`; ``extra_check(world)``
    adds method-specific rules and ``extra_fields`` (name -> int) more values every rank must share.
    ``softcap`` and the presence of ``sinks`` must agree too (the sink values are a replicated
    parameter's, not compared)."""
    world = group_world(group)
    error = None
    try:
        check_qkv(q, k, v)
        check_layout(layout)
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"q and k/v shards must have the same length; got {q.shape[1]} and {k.shape[1]}")
        check_seq_len(q.shape[1] * world, layout, world)
        check_softcap_sinks(q, softcap, sinks)
        backend = resolve_backend(backend, q.device)
        if extra_check is not None:
            extra_check(world)
    except ValueError as e:
        error = str(e)
    qs, ks = list(q.shape) + [-1] * 4, list(k.shape) + [-1] * 4  # padded: malformed shapes still encode
    fields = {"batch": qs[0], "local sequence length": qs[1], "query heads": qs[2], "head_dim": qs[3]}
    fields.update({"key/value heads": ks[2], "dtype": encode_dtype(q.dtype)})
    fields.update({"span kind code": SPAN_KINDS.index(span.kind), "span size": span.size, "sinks": span.n_sink})
    fields.update({"softcap (float64 bits)": _softcap_field(softcap), "learnable sinks given": int(sinks is not None)})
    fields.update(extra_fields or {})
    fields["layout code"] = LAYOUTS.index(layout) if layout in LAYOUTS else -1
    check_call(group, fields, error, decode={"dtype": decode_dtype})
    return default_scale(q.shape[-1], softmax_scale), backend


def _softcap_field(softcap) -> int:
    """The agreement code of ``softcap``; -1 for a value its check rejects (that rank reports it)."""
    try:
        return softcap_code(softcap)
    except (TypeError, ValueError):
        return -1


__all__ = ["attention_setup", "group_world"]
