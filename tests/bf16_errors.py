"""bf16 accuracy of lsts' sequence-parallel attention against single-process PyTorch SDPA at bf16.

Both run on the same bf16 inputs (causal, GQA, packed documents); both are compared with a float64
explicit softmax of those inputs. The error of a tensor is ``||got - want||_2 / ||want||_2`` over
the whole sequence (each rank adds its shard's squared sums). Used by ``tests/test_bf16_accuracy.py``
(the bound) and ``bench/compat_errors.py`` (the table of ``docs/coming_from.md``).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lsts.parallel import hybrid_attention, ring_attention, shard_sequence, ulysses_attention

NAMES = ("out", "dq", "dk", "dv")
CU = [0, 13, 50, 64]  # packed documents whose boundaries cut shards (N = 64 splits into 2·4 zigzag chunks)
SHAPE = dict(batch=2, n=64, heads=8, kv_heads=2, head_dim=32)  # GQA 8/2


def bf16_inputs(seed: int, batch: int, n: int, heads: int, kv_heads: int, head_dim: int):
    """q, k, v, dout ``[B, N, H(_kv), D]`` in bf16, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(batch, n, heads, head_dim, generator=g) for _ in range(2))
    k, v = (torch.randn(batch, n, kv_heads, head_dim, generator=g) for _ in range(2))
    return [x.bfloat16() for x in (q, k, v, dout)]


def keep_mask(n: int, cu: list[int]) -> torch.Tensor:
    """``[N, N]`` causal attention inside the documents of ``cu``."""
    pos = torch.arange(n)
    doc = torch.bucketize(pos, torch.tensor(cu[1:]), right=True)
    return (pos[None, :] <= pos[:, None]) & (doc[None, :] == doc[:, None])


def oracle(q, k, v, dout, keep):
    """Explicit softmax in float64 of the (exactly representable) bf16 values: out, dq, dk, dv."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, 2)) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.repeat_interleave(group, 2))
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout.double())]


def with_grads(fn, q, k, v, dout):
    """``[out, dq, dk, dv]`` of ``fn`` on leaf copies of q, k, v."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def sdpa(q, k, v):
    """Single-process PyTorch SDPA (causal + documents as a boolean mask, GQA), ``[B, N, H, D]``."""
    keep = keep_mask(q.shape[1], CU)
    t = functools.partial(torch.transpose, dim0=1, dim1=2)
    return t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=keep, enable_gqa=True))


def squared_sums(got, want) -> dict[str, tuple[float, float]]:
    """name -> (sum of squared errors, sum of squared oracle values)."""
    return {n: (float(((a.double() - b) ** 2).sum()), float((b**2).sum())) for n, a, b in zip(NAMES, got, want)}


def relative(sums: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """Add the ranks' squared sums: name -> relative L2 error over the whole sequence."""
    return {n: (sum(s[n][0] for s in sums) / sum(s[n][1] for s in sums)) ** 0.5 for n in NAMES}


def sdpa_errors(seed: int) -> dict[str, float]:
    """Relative errors of bf16 SDPA in one process."""
    q, k, v, dout = bf16_inputs(seed, **SHAPE)
    want = oracle(q, k, v, dout, keep_mask(q.shape[1], CU))
    return relative([squared_sums(with_grads(sdpa, q, k, v, dout), want)])


def _method(name: str, rank: int, world: int):
    """``(attention fn on local shards, layout)`` of a case name: ring, ulysses or hybrid-u{U}."""
    if name == "ring":
        return functools.partial(ring_attention, layout="zigzag"), "zigzag"
    if name == "ulysses":
        return functools.partial(ulysses_attention, layout="contiguous"), "contiguous"
    n_uly = int(name.removeprefix("hybrid-u"))
    # lsts' mesh order: Ulysses groups of consecutive ranks, ring groups strided by U.
    ulysses = [dist.new_group(list(range(r, r + n_uly))) for r in range(0, world, n_uly)]
    ring = [dist.new_group(list(range(u, world, n_uly))) for u in range(n_uly)]
    groups = dict(ring_group=ring[rank % n_uly], ulysses_group=ulysses[rank // n_uly])
    return functools.partial(hybrid_attention, layout="zigzag", **groups), "zigzag"


def lsts_rank(rank: int, world: int, method: str, seed: int) -> dict[str, tuple[float, float]]:
    """One rank of a ``run_ranks`` call: this shard's squared sums (combine them with `relative`)."""
    q, k, v, dout = bf16_inputs(seed, **SHAPE)
    want = oracle(q, k, v, dout, keep_mask(q.shape[1], CU))
    fn, layout = _method(method, rank, world)
    shard = functools.partial(shard_sequence, layout=layout)
    got = with_grads(functools.partial(fn, cu_seqlens=CU), *map(shard, (q, k, v, dout)))
    return squared_sums(got, [shard(w) for w in want])
