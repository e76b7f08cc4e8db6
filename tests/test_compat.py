"""`lsts.parallel.compat` against the peers' own conventions, re-created here from their tests:
ring-flash-attention's ``extract_local`` (fixed-length zigzag / ring / stripe, per-document varlen,
llama3's contiguous slices with ``llama3_flash_attn_prepare_cu_seqlens``) and yunchang's
``EXTRACT_FUNC_DICT`` with both of its group layouts. Every case compares out, lse (where the peer
returns it), dq, dk, dv with an explicit float64 softmax written below; GQA and an odd head dim
throughout. Also: per-row documents, uneven `all_to_all`, and the hybrid's mesh check."""

import functools
import itertools

import pytest
import torch
import torch.distributed as dist

from lsts.kernels.attention import attention
from lsts.parallel import all_to_all, compat, hybrid_attention, ring_attention, shard_sequence, ulysses_attention
from tests.distributed import run_ranks
from tests.oracle import rel_err

B, H, HKV, D = 2, 4, 2, 9
TOL = 1e-10
NAMES = ("out", "lse", "dq", "dk", "dv")


# --- the oracle: explicit softmax in float64 on the whole sequence ---------------------------------


def flash_keep(n: int, causal: bool, window=(-1, -1), cu=None) -> torch.Tensor:
    """FlashAttention's mask written out: query i sees keys i - left .. i + right (-1: unbounded),
    ``causal`` sets right = 0; with ``cu`` only keys of the query's document."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    left, right = window[0], 0 if causal else window[1]
    keep = torch.ones(n, n, dtype=torch.bool)
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    if cu is not None:
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu[1:]) - torch.tensor(cu[:-1]))
        keep &= doc[:, None] == doc[None, :]
    return keep


def oracle(q, k, v, dout, keep, softcap=0.0):
    """``q [B, N, H, D]`` etc., ``keep [N, N]`` or ``[B, N, N]``: out, lse [B, H, N], dq, dk, dv.
    ``softcap`` as FlashAttention applies it: to the scaled scores, before the mask."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, 2)) / q.shape[-1] ** 0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    keep = keep if keep.dim() == 3 else keep[None]
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (scores - lse[..., None]).exp(), v.repeat_interleave(group, 2))
    return [out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), dout.double())]


def inputs(n: int, seed: int, batch=B, hkv=HKV, lead=True):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, n) if lead else (n,)
    q, dout = (torch.randn(*shape, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(*shape, hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout


# --- the peers' sharding helpers, re-created from their tests --------------------------------------


def rfa_zigzag(x, rank, world, dim=1):
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim).contiguous()


def rfa_ring(x, rank, world, dim=1):
    return x.chunk(world, dim=dim)[rank].contiguous()


def rfa_stripe(x, rank, world, dim=1):
    x = torch.stack(x.split(world, dim=dim), dim=dim).transpose(dim, dim + 1)
    return x[tuple(rank if i == dim else slice(None) for i in range(x.dim()))].contiguous()


def rfa_varlen(x, cu, rank, world, scheme):
    """Per-document sharding of ring-flash-attention's varlen tests (rows along dim 0)."""
    parts = []
    for a, b in itertools.pairwise(cu):
        if scheme == "zigzag":
            chunks = x[a:b].chunk(2 * world)
            parts += [chunks[rank], chunks[2 * world - 1 - rank]]
        elif scheme == "ring":
            parts.append(x[a:b].chunk(world)[rank])
        else:
            parts.append(x[a + rank : b : world])
    return torch.cat(parts).contiguous()


def yunchang_extract(x, rank, world, rd, ud, kind):
    """yunchang's EXTRACT_FUNC_DICT: ring rank rank // ud, Ulysses rank rank % ud."""
    if kind == "basic":
        return x.chunk(world, dim=1)[rank].contiguous()
    if kind == "zigzag":
        chunks = x.chunk(2 * rd, dim=1)
        r, u = rank // ud, rank % ud
        return torch.cat([chunks[r], chunks[2 * rd - r - 1]], dim=1).chunk(ud, dim=1)[u].contiguous()
    b, n = x.shape[:2]
    striped = x.reshape(b, n // rd, rd, -1).transpose(1, 2).reshape(b, n, -1).chunk(world, dim=1)[rank]
    return striped.reshape(b, n // world, *x.shape[2:]).contiguous()


def errors(got, want, names=NAMES):
    return {name: rel_err(a, b) for name, a, b in zip(names, got, want)}


def run_local(fn, q, k, v, dout):
    """Run ``fn`` on leaf copies of the local shards: (its outputs, dq, dk, dv)."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    result = fn(q, k, v)
    out = result[0] if isinstance(result, tuple) else result
    out.backward(dout)
    return result, [x.grad for x in (q, k, v)]


# --- ring-flash-attention: fixed length -------------------------------------------------------------

SOFTCAP = 1.5  # below the spread of the scores (std 1 here), so capping changes every row

FIXED = [  # name, function, sharding, causal, window_size, packing, softcap
    ("zigzag-causal", compat.zigzag_ring_flash_attn_func, rfa_zigzag, True, (-1, -1), None, 0.0),
    ("zigzag-window3-kvpacked", compat.zigzag_ring_flash_attn_kvpacked_func, rfa_zigzag, True, (3, 0), "kv", 0.0),
    ("zigzag-window1-softcap", compat.zigzag_ring_flash_attn_func, rfa_zigzag, False, (1, 0), None, SOFTCAP),
    ("ring-full", compat.ring_flash_attn_func, rfa_ring, False, (-1, -1), None, 0.0),
    ("ring-full-softcap", compat.ring_flash_attn_func, rfa_ring, False, (-1, -1), None, SOFTCAP),
    ("ring-window-without-causal", compat.ring_flash_attn_func, rfa_ring, False, (5, 0), None, 0.0),
    ("ring-causal-only-right-0", compat.ring_flash_attn_func, rfa_ring, False, (-1, 0), None, 0.0),
    ("stripe-causal-qkvpacked", compat.stripe_flash_attn_qkvpacked_func, rfa_stripe, True, (-1, -1), "qkv", 0.0),
    ("stripe-causal-right9-softcap", compat.stripe_flash_attn_func, rfa_stripe, True, (-1, 9), None, SOFTCAP),
]


def _call_packed(fn, packing, args, kw, q, k, v):
    """``fn(q, k, v, *args, **kw)`` in its unpacked, kv-packed or qkv-packed form."""
    if packing == "qkv":
        return fn(torch.stack([q, k, v], dim=-3), *args, **kw)
    if packing == "kv":
        return fn(q, torch.stack([k, v], dim=-3), *args, **kw)
    return fn(q, k, v, *args, **kw)


def _fixed_length_cases(rank, world):
    n, cases = 8 * world, {}
    for i, (name, fn, shard, causal, window, packing, softcap) in enumerate(FIXED):
        q, k, v, dout = inputs(n, seed=i, hkv=H if packing == "qkv" else HKV)
        out, lse, *grads = oracle(q, k, v, dout, flash_keep(n, causal, window), softcap)
        want = [shard(out, rank, world), shard(lse, rank, world, dim=2), *(shard(g, rank, world) for g in grads)]
        kw = dict(causal=causal, window_size=window, return_attn_probs=True, softcap=softcap)
        call = functools.partial(_call_packed, fn, packing, (0.0, None), kw)  # dropout_p, softmax_scale by position
        (out, lse, probs), grads = run_local(call, *(shard(x, rank, world) for x in (q, k, v, dout)))
        cases[name] = errors([out, lse, *grads], want)
        cases[name]["third value is None"] = float(probs is not None)
    return cases


# --- ring-flash-attention: varlen -----------------------------------------------------------------

VARLEN = [  # name, function, per-document sharding, causal, window_size, packing, softcap
    ("zigzag-varlen-causal", compat.zigzag_ring_flash_attn_varlen_func, "zigzag", True, (-1, -1), None, 0.0),
    ("zigzag-varlen-qkvpack", compat.zigzag_ring_flash_attn_varlen_qkvpacked_func, "zigzag", True, (-1, -1), "qkv", 0),
    ("zigzag-varlen-window-softcap", compat.zigzag_ring_flash_attn_varlen_func, "zigzag", True, (2, 0), None, SOFTCAP),
    ("ring-varlen-window-kvpacked", compat.ring_flash_attn_varlen_kvpacked_func, "ring", True, (3, 0), "kv", 0.0),
    ("stripe-varlen-full", compat.stripe_flash_attn_varlen_func, "stripe", False, (-1, -1), None, 0.0),
    ("stripe-varlen-full-softcap", compat.stripe_flash_attn_varlen_func, "stripe", False, (-1, -1), None, SOFTCAP),
]


def _varlen_cases(rank, world):
    cases = {}
    cu = [0, 4 * world, 12 * world, 14 * world]  # every document splits into 2P chunks
    local_cu = torch.tensor(cu, dtype=torch.int32) // world  # what the peer's tests pass
    local_max = int((local_cu[1:] - local_cu[:-1]).max())
    for i, (name, fn, scheme, causal, window, packing, softcap) in enumerate(VARLEN):
        q, k, v, dout = inputs(cu[-1], seed=10 + i, batch=1, hkv=H if packing == "qkv" else HKV)
        out, lse, *grads = oracle(q, k, v, dout, flash_keep(cu[-1], causal, window, cu), softcap)
        local = functools.partial(rfa_varlen, cu=cu, rank=rank, world=world, scheme=scheme)
        want = [local(out[0]), local(lse[0].T).T, *(local(g[0]) for g in grads)]
        kw = dict(causal=causal, window_size=window, return_attn_probs=True, softcap=softcap)
        call = functools.partial(_call_packed, fn, packing, (local_cu, local_max), kw)
        (out, lse, _), grads = run_local(call, *(local(x[0]) for x in (q, k, v, dout)))
        bounds = list(itertools.pairwise(local_cu.tolist()))
        got_lse = torch.cat([lse[d, :, : b - a] for d, (a, b) in enumerate(bounds)], dim=1)  # the peer's extract_lse
        cases[name] = errors([out, got_lse, *grads], want)
        cases[name]["lse padding is -inf"] = float(not bool((lse[0, :, bounds[0][1] :] == float("-inf")).all()))
    return cases


def _llama3_cases(rank, world):
    cases = {}
    cu = torch.tensor([0, 5, 17, 18, 10 * world], dtype=torch.int32)  # documents across slice borders
    n, rows = int(cu[-1]), slice(rank * 10, (rank + 1) * 10)
    # The window crosses slice borders; softcap on the non-causal call.
    for causal, stride, window, softcap in ((True, 1, (4, 0), 0.0), (False, HKV, (-1, -1), SOFTCAP)):
        q, k, v, dout = inputs(n, seed=20 + stride, batch=1)
        out, lse, *grads = oracle(q, k, v, dout, flash_keep(n, causal, window, cu.tolist()), softcap)
        want = [out[0, rows], lse[0, :, rows], *(g[0, rows] for g in grads)]
        cu_q, cu_k, max_q, max_k, k_slice = compat.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, world)
        kw = dict(causal=causal, window_size=window, softcap=softcap, return_attn_probs=True)

        def call(q, k, v, prepared=(cu_q, cu_k, max_q, max_k, stride, k_slice), kw=kw):
            return compat.llama3_flash_attn_varlen_func(q, k, v, *prepared, **kw)

        (out, lse, _), grads = run_local(call, *(x[0, rows] for x in (q, k, v, dout)))
        cases[f"llama3-causal{causal}-heads_k_stride{stride}-window{window}-softcap{softcap}"] = errors(
            [out, lse, *grads], want
        )
    return cases


# --- yunchang ---------------------------------------------------------------------------------------


def _yunchang_cases(rank, world, n_uly, n_ring, low):
    cases = {}
    ulysses_pg, ring_pg = compat.set_seq_parallel_pg(n_uly, n_ring, rank, world, use_ulysses_low=low)
    mesh_rank = dist.get_rank(ring_pg) * n_uly + dist.get_rank(ulysses_pg)  # yunchang's rank when low
    n = 4 * world
    # kind, causal, window_size, softcap; strip sends q, k, v in one exchange (no GQA)
    for i, (kind, causal, window, softcap) in enumerate(
        (("zigzag", True, (-1, -1), 0.0), ("zigzag", True, (3, 0), SOFTCAP), ("basic", False, (-1, -1), SOFTCAP),
         ("strip", True, (-1, -1), 0.0))
    ):  # fmt: skip
        q, k, v, dout = inputs(n, seed=30 + i, hkv=H if kind == "strip" else HKV)
        out, _, *grads = oracle(q, k, v, dout, flash_keep(n, causal, window), softcap)
        shard = functools.partial(yunchang_extract, rank=mesh_rank, world=world, rd=n_ring, ud=n_uly, kind=kind)
        name = f"long-context-{kind}-window{window}-softcap{softcap}-u{n_uly}r{n_ring}-low{low}"
        cases[name] = {
            "long_context_shard differs": float(not torch.equal(shard(q), compat.long_context_shard(q, kind)))
        }
        attn = compat.LongContextAttention(ring_impl_type=kind, use_pack_qkv=kind == "strip")
        call = functools.partial(attn, causal=causal, window_size=window, softcap=softcap)
        got, got_grads = run_local(call, *map(shard, (q, k, v, dout)))
        cases[name].update(errors([got, *got_grads], [shard(x) for x in (out, *grads)], ("out", "dq", "dk", "dv")))
    return cases


def _ulysses_module_case(rank, world):
    n = 4 * world
    q, k, v, dout = inputs(n, seed=40)
    out, _, *grads = oracle(q, k, v, dout, flash_keep(n, causal=True, window=(2, 0)), SOFTCAP)
    shard = functools.partial(rfa_ring, rank=rank, world=world)
    module = compat.UlyssesAttention(dist.group.WORLD)
    call = functools.partial(module, causal=True, window_size=(2, 0), softcap=SOFTCAP)
    got, got_grads = run_local(call, *map(shard, (q, k, v, dout)))
    want = [shard(x) for x in (out, *grads)]
    return {"ulysses-module-window-softcap": errors([got, *got_grads], want, ("out", "dq", "dk", "dv"))}


# --- per-row documents, uneven all-to-all, clear errors --------------------------------------------

ROWS = [[0, 6, 16], [0, 3, 9, 16], [0, 6, 16]]  # rows 0 and 2 share their documents


def _per_row_cases(rank, world):
    n, cases = 16, {}
    singles = [dist.new_group([r]) for r in range(world)]
    keep = torch.stack([flash_keep(n, True, cu=row) for row in ROWS])
    as_tensor = torch.tensor([[0, 6, 16], [0, 9, 16], [0, 6, 16]])
    keep_tensor = torch.stack([flash_keep(n, True, cu=row.tolist()) for row in as_tensor])
    specs = [  # name, attention, layout, cu_seqlens, mask
        ("ring-zigzag-lists", ring_attention, "zigzag", ROWS, keep),
        ("ulysses-stripe-tensor", ulysses_attention, "stripe", as_tensor, keep_tensor),
        (
            "hybrid-u1r2-contiguous",
            functools.partial(hybrid_attention, ring_group=dist.group.WORLD, ulysses_group=singles[rank]),
            "contiguous",
            ROWS,
            keep,
        ),
    ]
    for i, (name, fn, layout, cu, mask) in enumerate(specs):
        q, k, v, dout = inputs(n, seed=50 + i, batch=3)
        want = oracle(q, k, v, dout, mask)
        shard = functools.partial(shard_sequence, layout=layout)
        call = functools.partial(fn, layout=layout, cu_seqlens=cu, return_lse=True)
        (out, lse), grads = run_local(call, *map(shard, (q, k, v, dout)))
        cases[name] = errors([out, lse, *grads], [shard(want[0]), shard(want[1], dim=2), *map(shard, want[2:])])
    return cases


def _all_to_all_case(rank, world):
    """5 heads over the ranks (uneven) while every rank holds a different number of tokens."""
    seq = [3 + r for r in range(world)]
    full, weight = (torch.randn(2, sum(seq), 5, 3, generator=torch.Generator().manual_seed(s)) for s in (60, 61))
    start = sum(seq[:rank])
    x = full[:, start : start + seq[rank]].clone().requires_grad_()
    y = all_to_all(x, scatter_dim=2, gather_dim=1, gather_sizes=seq)
    heads = [len(h) for h in torch.arange(5).tensor_split(world)]
    h0 = sum(heads[:rank])
    y.backward(weight[:, :, h0 : h0 + heads[rank]])  # the gradient of sum(y * weight) over all ranks
    got = [y, x.grad]
    want = [full[:, :, h0 : h0 + heads[rank]], weight[:, start : start + seq[rank]]]
    return {"all_to_all-uneven": errors(got, want, ("out", "dx"))}


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _clear_errors(rank, world):
    q = torch.randn(1, 8, H, D)
    return {
        "ring stripe with documents": _error(lambda: ring_attention(q, q, q, layout="stripe", cu_seqlens=[0, 5, 16])),
        # Rank 1 has a third row: without the row plan in the first call's checks it would wait forever.
        "rows differ across ranks": _error(
            lambda: ring_attention(
                *[torch.randn(2 + rank, 8, H, D)] * 3, cu_seqlens=[*ROWS[:2], [0, 8, 16]][: 2 + rank]
            )
        ),
        "LongContextAttention on groups of no mesh": _error(
            lambda: compat.LongContextAttention(ulysses_pg=dist.group.WORLD, ring_pg=dist.group.WORLD)(q, q, q)
        ),
        "stripe with a window": _error(
            lambda: compat.stripe_flash_attn_func(q, q, q, causal=True, window_size=(3, 0), softcap=SOFTCAP)
        ),
        "hybrid with stripe": _error(
            lambda: hybrid_attention(q, q, q, dist.group.WORLD, dist.new_group([rank]), layout="stripe")
        ),
    }


def _world_2(rank, world):
    results = {}
    for cases in (
        _fixed_length_cases,
        _varlen_cases,
        _llama3_cases,
        _ulysses_module_case,
        _per_row_cases,
        _all_to_all_case,
    ):
        results.update(cases(rank, world))
    results.update(_yunchang_cases(rank, world, n_uly=2, n_ring=1, low=True))
    results.update(_yunchang_cases(rank, world, n_uly=1, n_ring=2, low=True))
    return results, _clear_errors(rank, world)


def _world_4(rank, world):
    results = {}
    results.update(_yunchang_cases(rank, world, n_uly=2, n_ring=2, low=True))
    results.update(_yunchang_cases(rank, world, n_uly=2, n_ring=2, low=False))
    results.update(_fixed_length_cases(rank, world))
    results.update(_varlen_cases(rank, world))
    # yunchang's use_ulysses_low=False groups are not lsts' hybrid order: an error, not wrong numbers.
    ulysses_pg, ring_pg = compat.set_seq_parallel_pg(2, 2, rank, world, use_ulysses_low=False)
    q = torch.randn(1, 4, H, D)
    message = _error(lambda: hybrid_attention(q, q, q, ring_pg, ulysses_pg))
    return results, {"hybrid with ring groups of consecutive ranks": message}


def _assert_cases(per_rank):
    for rank, (cases, _) in enumerate(per_rank):
        for case, errs in cases.items():
            for name, err in errs.items():
                assert err <= TOL, f"rank {rank} {case} {name}: {err:.2e}"


@pytest.fixture(scope="module")
def world_2():
    return run_ranks(_world_2, 2)


def test_compat_functions_match_the_oracle_on_the_peers_shardings(world_2):
    expected = {name for name, *_ in FIXED} | {name for name, *_ in VARLEN} | {"ulysses-module-window-softcap"}
    assert expected <= set(world_2[0][0])
    _assert_cases(world_2)


def test_per_row_documents_and_uneven_all_to_all(world_2):
    cases = world_2[0][0]
    assert {"ring-zigzag-lists", "ulysses-stripe-tensor", "hybrid-u1r2-contiguous", "all_to_all-uneven"} <= set(cases)


def test_unsupported_layout_combinations_name_the_supported_ones(world_2):
    for _, messages in world_2:
        assert "'zigzag' or 'contiguous'" in messages["ring stripe with documents"]
        assert "'zigzag' or 'contiguous'" in messages["stripe with a window"]
        assert "hybrid attention supports the layouts ('contiguous', 'zigzag')" in messages["hybrid with stripe"]
        assert "rows with own documents must be the same on every rank" in messages["rows differ across ranks"]
        assert (
            "ring rank (members of one Ulysses group) must be the same"
            in messages["LongContextAttention on groups of no mesh"]
        )


def test_world_4_hybrid_layouts_and_group_check():
    per_rank = run_ranks(_world_4, 4)
    _assert_cases(per_rank)
    for _, messages in per_rank:
        assert "Ulysses axis inner" in messages["hybrid with ring groups of consecutive ranks"]


# --- in one process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causal,window", [(True, (4, 0)), (False, (4, 0)), (False, (-1, 0)), (True, (-1, 7)), (False, (-1, -1))]
)
def test_flash_window_size_means_what_flash_attention_means(causal, window):
    from lsts.parallel.compat.flash_args import flash_span

    n = 13
    q, k, v, dout = inputs(n, seed=70)
    out, lse = attention(q, k, v, span=flash_span(causal, window), backend="reference")
    want = oracle(q, k, v, dout, flash_keep(n, causal, window))
    assert rel_err(out, want[0]) <= TOL and rel_err(lse, want[1]) <= TOL


def test_per_row_documents_in_local_attention():
    q, k, v, dout = inputs(16, seed=71, batch=3)
    want = oracle(q, k, v, dout, torch.stack([flash_keep(16, True, cu=row) for row in ROWS]))
    (out, lse), grads = run_local(lambda q, k, v: attention(q, k, v, cu_seqlens=ROWS), q, k, v, dout)
    for name, err in errors([out, lse, *grads], want).items():
        assert err <= TOL, f"{name}: {err:.2e}"
    with pytest.raises(ValueError, match="3 rows of boundaries but the batch has 2"):
        attention(q[:2], k[:2], v[:2], cu_seqlens=ROWS)


def test_llama3_prepare_matches_the_peer_convention():
    cu = torch.tensor([0, 5, 17, 18, 40], dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, k_slice = compat.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank=1, world_size=4)
    assert cu_q.tolist() == [0, 7, 8, 10] and cu_k.tolist() == [0, 12, 13, 15] and cu_k.dtype == torch.int32
    assert (max_q, max_k, k_slice) == (7, 12, slice(5, 20))
    _, cu_k, _, max_k, k_slice = compat.llama3_flash_attn_prepare_cu_seqlens(cu, False, rank=1, world_size=4)
    assert cu_k.tolist() == [0, 12, 13, 35] and (max_k, k_slice) == (22, slice(5, 40))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q: compat.zigzag_ring_flash_attn_func(q, q, q, 0.1), "dropout_p=0.1"),
        (lambda q: compat.ring_flash_attn_func(q, q, q, alibi_slopes=torch.ones(H)), "alibi_slopes"),
        (lambda q: compat.stripe_flash_attn_func(q, q, q, window_size=(2, 3)), "window_size=\\(2, 3\\)"),
        (lambda q: compat.ring_flash_attn_func(q, q, q, window_size=(3, -1)), "window_size=\\(3, -1\\)"),
        (
            lambda q: compat.zigzag_ring_flash_attn_varlen_func(q[0], q[0], q[0], [0, 8], 8, window_size=(-1, 2)),
            "later",
        ),
        (lambda q: compat.UlyssesAttention()(q, q, q, return_attn_probs=True), "return_attn_probs"),
        (
            lambda q: compat.LongContextAttention(ulysses_pg=1, ring_pg=1)(
                q, q, q, 0.0, None, False, (-1, -1), 0.0, None, False, False, 1
            ),
            "extra positional",
        ),
        (lambda q: compat.LongContextAttention(ring_impl_type="ring", ulysses_pg=1, ring_pg=1), "ring_impl_type"),
        (lambda q: compat.UlyssesAttention(attn_type="sage_fp8"), "attn_type=sage_fp8"),
    ],
)
def test_unsupported_arguments_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(1, 8, H, D))
