"""ring-flash-attention's varlen functions: packed documents as ``[total, H, D]`` rows.

**Per-document sharding** (``zigzag_ring_flash_attn_varlen_func``, ``ring_flash_attn_varlen_func``,
``stripe_flash_attn_varlen_func``): the peer shards *each document* over the P ranks — zigzag:
chunks r and 2P-1-r of the document's 2P; ring: chunk r of P; stripe: tokens r, r+P, ... of the
document — and passes the *local* ``cu_seqlens`` (the global ones divided by P, the same on every
rank) and the local ``max_seqlen``. That is not an lsts layout, so each call moves the rows into
one exactly (`lsts.parallel.relayout`: the global zigzag layout, or contiguous when the length does
not allow zigzag, or no move at all when the shards already are one), runs lsts' ring attention
with the global ``cu_seqlens``, and moves the output back. Cost: one all-to-all of q, k, v and one
of out forward, one of dout and one of dq, dk, dv backward (about two Ulysses exchanges each way).
With ``return_attn_probs`` the lse comes back as the peer pads it: ``[n_docs, H, max_seqlen]``
float32, per document in local order (-inf past each document's end).

**llama3** (``llama3_flash_attn_varlen_func`` with ``llama3_flash_attn_prepare_cu_seqlens``): rank
r holds the contiguous slice r of the packed sequence; K/V are all-gathered (``heads_k_stride``
K/V heads at a time, as the peer does) and each rank attends its queries to the keys of its
documents; the K/V gradients come back by reduce-scatter. Runs natively. Its lse is ``[H, total]``.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from lsts.kernels.attention import attention
from lsts.parallel.comm import agree_across_ranks, decode_dtype, encode_dtype
from lsts.parallel.compat.flash_args import attn_result, check_flash_args, flash_span
from lsts.parallel.compat.ring_flash_attn import kvpacked, qkvpacked
from lsts.parallel.relayout import Relayout
from lsts.parallel.ring import ring_attention
from lsts.parallel.sharding import layout_indices

SCHEMES = {"zigzag": 2, "contiguous": 1, "stripe": 1}  # per-document sharding -> divisor of local lengths


def per_document_positions(cu: list[int], world: int, rank: int, scheme: str) -> torch.Tensor:
    """Global positions of the rows rank ``rank`` holds when each document of ``cu`` (global
    boundaries) is sharded on its own by ``scheme``, documents in order."""
    parts = []
    for a, b in itertools.pairwise(cu):
        if scheme == "stripe":
            parts.append(torch.arange(a + rank, b, world))
            continue
        c = (b - a) // (world * SCHEMES[scheme])
        chunks = [rank] if scheme == "contiguous" else [rank, 2 * world - 1 - rank]
        parts += [torch.arange(a + i * c, a + (i + 1) * c) for i in chunks]
    return torch.cat(parts)


@functools.lru_cache(maxsize=64)
def _plan(scheme: str, cu: tuple[int, ...], world: int, rank: int) -> tuple[str, Relayout, Relayout]:
    """The lsts layout to attend in, and the moves there and back: the global zigzag layout, or
    contiguous when the length does not split into 2P chunks, or the one the shards already are
    (then nothing moves). Cached: the plan is O(N) index work on the host, per document list."""
    n = cu[-1]
    src = [per_document_positions(list(cu), world, r, scheme) for r in range(world)]
    layouts = [name for name in ("zigzag", "contiguous") if n % (world * (2 if name == "zigzag" else 1)) == 0]
    dsts = {name: [layout_indices(n, world, r, name) for r in range(world)] for name in layouts}
    same = [name for name in layouts if all(torch.equal(a, b) for a, b in zip(src, dsts[name]))]
    target = (same or layouts)[0]
    there = Relayout(src, dsts[target], rank)
    return target, there, there.inverse()


def _varlen_error(q, k, v, cu: list[int], max_seqlen: int, divisor: int, what: str) -> str | None:
    try:
        if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[2] != k.shape[2]:
            raise ValueError(f"varlen q, k, v must be [total, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
        lengths = [b - a for a, b in itertools.pairwise(cu)]
        if len(cu) < 2 or cu[0] != 0 or min(lengths) <= 0:
            raise ValueError(f"cu_seqlens must start at 0 and strictly increase, got {cu[:8]}...")
        if q.shape[0] != cu[-1] or k.shape[0] != cu[-1]:
            raise ValueError(f"cu_seqlens ends at {cu[-1]} but q has {q.shape[0]} and k {k.shape[0]} rows")
        if any(n % divisor for n in lengths):
            raise ValueError(f"{what} needs every document's local length even (each document split into 2P chunks)")
        if max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen ({max_seqlen}) is below the longest local document ({max(lengths)})")
    except ValueError as e:
        return str(e)
    return None


def agree_on_varlen(group, q, k, error: str | None, **more: int) -> None:
    """Every rank checks the same call before the first exchange (a ValueError on all of them)."""
    qs, ks = list(q.shape) + [-1] * 3, list(k.shape) + [-1] * 3
    fields = {"local rows": qs[0], "query heads": qs[1], "key/value heads": ks[1], "head_dim": qs[2]}
    fields.update({"dtype": encode_dtype(q.dtype), **more})
    agree_across_ranks(group, fields, error, decode={"dtype": decode_dtype})


def cu_fields(cu: list[int]) -> dict[str, int]:
    """Boundaries every rank must share: their count and a checksum."""
    return {"documents": len(cu) - 1, "cu_seqlens checksum": sum(i * c for i, c in enumerate(cu, start=1)) % 2**31}


def pad_lse(lse: torch.Tensor, cu: list[int], max_seqlen: int) -> torch.Tensor:
    """``lse [total, H]`` -> ``[n_docs, H, max_seqlen]`` as the peer returns it, -inf past each end."""
    out = lse.new_full((len(cu) - 1, lse.shape[1], max_seqlen), float("-inf"))
    for d, (a, b) in enumerate(itertools.pairwise(cu)):
        out[d, :, : b - a] = lse[a:b].transpose(0, 1)
    return out


def _per_document(scheme: str, name: str):
    def varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
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
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        cu = [int(c) for c in torch.as_tensor(cu_seqlens).tolist()]
        error = _varlen_error(q, k, v, cu, int(max_seqlen), SCHEMES[scheme], name)
        agree_on_varlen(group, q, k, error, **cu_fields(cu))
        target, there, back = _plan(scheme, tuple(c * world for c in cu), world, rank)
        q, k, v = (x[None] for x in there.apply([q, k, v], dim=0, group=group))
        kw = dict(
            layout=target, softmax_scale=softmax_scale, return_lse=True, backend=backend, span=span, softcap=softcap
        )
        out, lse = ring_attention(q, k, v, group, cu_seqlens=[c * world for c in cu], **kw)
        (out,) = back.apply([out[0]], dim=0, group=group)
        if not return_attn_probs:
            return out
        with torch.no_grad():
            (lse,) = back.apply([lse[0].transpose(0, 1)], dim=0, group=group)
        return attn_result(out, pad_lse(lse, cu, int(max_seqlen)), True)

    varlen_func.__name__ = varlen_func.__qualname__ = name
    varlen_func.__doc__ = (
        f"ring-flash-attention's ``{name}``: ``q [total_local, H, D]``, ``k, v [total_local, H_kv, D]``, each "
        f"document sharded on its own ({scheme}), ``cu_seqlens`` / ``max_seqlen`` local. Exact: the rows move into "
        f"an lsts layout and back (see the module docstring for the cost)."
    )
    return varlen_func


zigzag_ring_flash_attn_varlen_func = _per_document("zigzag", "zigzag_ring_flash_attn_varlen_func")
ring_flash_attn_varlen_func = _per_document("contiguous", "ring_flash_attn_varlen_func")
stripe_flash_attn_varlen_func = _per_document("stripe", "stripe_flash_attn_varlen_func")
zigzag_ring_flash_attn_varlen_qkvpacked_func = qkvpacked(zigzag_ring_flash_attn_varlen_func, dim=1)
ring_flash_attn_varlen_qkvpacked_func = qkvpacked(ring_flash_attn_varlen_func, dim=1)
stripe_flash_attn_varlen_qkvpacked_func = qkvpacked(stripe_flash_attn_varlen_func, dim=1)
zigzag_ring_flash_attn_varlen_kvpacked_func = kvpacked(zigzag_ring_flash_attn_varlen_func, dim=1)
ring_flash_attn_varlen_kvpacked_func = kvpacked(ring_flash_attn_varlen_func, dim=1)
stripe_flash_attn_varlen_kvpacked_func = kvpacked(stripe_flash_attn_varlen_func, dim=1)


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens: torch.Tensor, causal: bool, rank: int, world_size: int):
    """For rank ``rank`` holding the contiguous slice r of the packed sequence with *global*
    ``cu_seqlens``: ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)``.
    The keys a rank needs start at the beginning of its first document and end with its slice
    (``causal``) or with its last document; both boundary lists are relative to their own start."""
    cu = [int(c) for c in torch.as_tensor(cu_seqlens).tolist()]
    if cu[-1] % world_size:
        raise ValueError(f"the packed length {cu[-1]} must be a multiple of world_size ({world_size})")
    n = cu[-1] // world_size
    lo, hi = rank * n, (rank + 1) * n
    inside = [c for c in cu if lo < c < hi]  # boundaries strictly inside this rank's slice
    k_start = max(c for c in cu if c <= lo)
    k_end = hi if causal else min(c for c in cu if c >= hi)
    q_cu = [0, *(c - lo for c in inside), n]
    k_cu = [0, *(c - k_start for c in inside), k_end - k_start]
    like = torch.as_tensor(cu_seqlens)
    as_cu = functools.partial(torch.tensor, dtype=like.dtype, device=like.device)
    return as_cu(q_cu), as_cu(k_cu), _longest(q_cu), _longest(k_cu), slice(k_start, k_end)


def _longest(cu: list[int]) -> int:
    return max(b - a for a, b in itertools.pairwise(cu))


def llama3_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    heads_k_stride,
    local_k_slice,
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
    """ring-flash-attention's llama3 context parallelism: ``q [total_local, H, D]``, ``k, v
    [total_local, H_kv, D]`` (rank r's contiguous slice), the boundaries and key slice from
    `llama3_flash_attn_prepare_cu_seqlens`. K/V are all-gathered ``heads_k_stride`` heads at a time
    (the peer's exchange; under autograd every gathered slice is kept for the backward). Returns
    ``out`` or ``(out, lse [H, total_local], None)``."""
    check_flash_args(dropout_p, alibi_slopes)
    span = flash_span(causal, window_size)
    rank = dist.get_rank(group)
    q_cu = [int(c) for c in torch.as_tensor(cu_seqlens_q).tolist()]
    k_cu = [int(c) for c in torch.as_tensor(cu_seqlens_k).tolist()]
    q_offset = rank * q.shape[0] - local_k_slice.start  # our queries among the gathered keys we keep
    error = _varlen_error(q, k, v, q_cu, int(max_seqlen_q), 1, "llama3_flash_attn_varlen_func")
    if error is None and (k.shape[1] % heads_k_stride or k_cu[-1] != local_k_slice.stop - local_k_slice.start):
        error = "heads_k_stride must divide the K/V heads, and cu_seqlens_k end at the length of local_k_slice"
    if error is None and (max_seqlen_k < _longest(k_cu) or q_offset < 0):
        error = "max_seqlen_k is below the longest key document, or local_k_slice starts after this rank's queries"
    agree_on_varlen(group, q, k, error, heads_k_stride=heads_k_stride)
    group_name = group or dist.group.WORLD
    per_kv = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for h in range(0, k.shape[1], heads_k_stride):
        kv = torch.cat([k[:, h : h + heads_k_stride], v[:, h : h + heads_k_stride]], dim=1)
        kv = funcol.wait_tensor(funcol.all_gather_single_autograd(kv.contiguous(), 0, group_name))[local_k_slice]
        k_h, v_h = kv.chunk(2, dim=1)
        q_h = q[:, h * per_kv : (h + heads_k_stride) * per_kv]
        kw = dict(softmax_scale=softmax_scale, backend=backend, span=span, softcap=softcap)
        kw.update(q_offset=q_offset, cu_seqlens=k_cu)
        out, lse = attention(q_h[None], k_h[None], v_h[None], **kw)
        outs.append(out[0])
        lses.append(lse[0])
    return attn_result(torch.cat(outs, dim=1), torch.cat(lses, dim=0), return_attn_probs)


llama3_flash_attn_varlen_qkvpacked_func = qkvpacked(llama3_flash_attn_varlen_func, dim=1)
llama3_flash_attn_varlen_kvpacked_func = kvpacked(llama3_flash_attn_varlen_func, dim=1)
