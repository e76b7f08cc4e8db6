"""Causal attention forward + backward, fp32, on CPU: sequence-parallel lsts against an ideal
single process, DeepSpeed-Ulysses and vanilla attention. Results go in ``docs/benchmarks.md``.

Two modes, each printing markdown tables to stdout (progress goes to stderr):

**Timing** (default). On ``--world`` cores: *ideal* is one process with ``--world`` torch threads
running ``scaled_dot_product_attention(is_causal=True)`` on the full sequence; every other
contender runs on ``--world`` gloo ranks of one thread each, holding a shard of the sequence:
lsts ring attention (zigzag, contiguous, stripe layouts), lsts Ulysses (zigzag), lsts RSA (the
O(N^2/P)-memory seed method; skipped where it would not fit) and DeepSpeed's
``DistributedAttention`` around a causal SDPA (contiguous shards, the layout it assumes). Every
distributed contender is first checked against a single-process float64 SDPA at a small length.
Columns: time per forward + backward (max over ranks), efficiency = ideal time / time, peak RSS
per rank and its increase over the resident set once imports, group and inputs are in place. The
peak is ``ru_maxrss``, restarted (``/proc/self/clear_refs``) after the inputs are built so that it
covers the attention iterations only; inputs never exist in full on a rank (see `virtual_randn`).

    python bench/attention.py                                  # 16384 and 65536: ~30 min on 2 cores
    python bench/attention.py --seq-lens 16384 --iters 3       # ~5 min
    python bench/attention.py --seq-lens 65536 --warmup 0      # ~15 min (one ~2 min iteration each)

RSA is skipped where its estimated score memory per rank passes ``--rsa-max-gib`` (default 8: at
N = 16384 on 2 ranks it needs ~10 GiB per rank). DeepSpeed builds a small extension on first use
(~40 s, cached afterwards).

**Longest sequence that fits** (``--max-seq``). ``--world`` ranks (default 4, one thread each)
with a per-rank budget of ``--mem-gib`` GiB of peak RSS: doubling then bisection finds the longest
N for which lsts Ulysses and lsts ring attention (zigzag) complete forward + backward with every
rank within budget, and the same for vanilla attention (materialized ``softmax(QK^T*s + mask) V``)
in one single-threaded process. A rank passing the budget is killed at once. Probes cost O(N^2)
compute, so when the next probe would overrun ``--time-limit`` the search stops and also reports
the limit projected from a linear fit of the measured peak RSS (lsts memory is linear in N).

    python bench/attention.py --max-seq                        # 4 GiB per rank, 4 ranks: ~14 min
    python bench/attention.py --max-seq --mem-gib 0.5 --time-limit 300   # a quick check, ~5 min

On 2 cores at 4 GiB the lsts limits (~10^5 tokens) take longer to reach than the time limit, so
their rows show the longest N measured and the projected limit; vanilla's is always measured.
Probe wall times there are 4 ranks sharing 2 cores: not performance numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import _common as common  # first: puts the repository root on sys.path
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lsts.kernels.attention import CAUSAL
from lsts.parallel import layout_indices, ring_attention, rsa_attention, shard_sequence, ulysses_attention

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Distributed contenders and the sequence layout of the shards each one is given.
SHARDED = {
    "ring-zigzag": "zigzag",
    "ring-contiguous": "contiguous",
    "ring-stripe": "stripe",
    "ulysses-zigzag": "zigzag",
    "rsa": "contiguous",
    # DeepSpeed gathers the sequence in rank order, so its causal mask is right only for contiguous shards.
    "deepspeed-ulysses": "contiguous",
}
SINGLE = ("ideal", "vanilla")  # one process, full sequence, [B, H, N, D]
TIMING_CONTENDERS = ("ideal", *SHARDED)
MAXSEQ_CONTENDERS = ("vanilla", "ulysses-zigzag", "ring-zigzag")
CHECK_SEED = 7


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class RunSpec:
    """One contender at one length, as sent to every rank of a fresh process group."""

    contender: str
    seq_len: int
    shape: Shape
    warmup: int
    iters: int
    seed: int = 0


# ------------------------------------------------------------------------------- attention kernels


def _sdpa_bhnd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on whole sequences in ``[B, S, H, D]``: DeepSpeed's local attention."""
    return _sdpa_bhnd(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def vanilla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Textbook multi-head attention in ``[B, H, N, D]``: the full score matrix, an additive causal
    mask, softmax, then the value product; autograd keeps the N x N probabilities for backward."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = torch.full((n, n), float("-inf")).triu_(1)
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1])) + mask
    return torch.softmax(scores, dim=-1) @ v


def _deepspeed_attention() -> AttnFn:
    """DeepSpeed-Ulysses on this gloo group: ``[B, S_local, H, D]`` in and out. With the batch first,
    ``scatter_idx=2`` (heads) and ``gather_idx=1`` (sequence) with ``batch_dim_idx=0`` turn
    ``[B, S/P, H, D]`` into ``[B, S, H/P, D]`` for the local attention and back."""
    threads = torch.get_num_threads()
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention

    torch.set_num_threads(threads)  # the import must not change the one-thread-per-rank setting
    # torch.distributed is already up: DeepSpeed wraps the existing default group.
    ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    layer = DistributedAttention(_sdpa_bshd, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    return partial(layer, batch_dim_idx=0)


def build_attention(contender: str) -> AttnFn:
    """The attention callable of ``contender``, built inside the rank (after the group is up)."""
    if contender == "ideal":
        return _sdpa_bhnd
    if contender == "vanilla":
        return vanilla_attention
    if contender.startswith("ring-"):
        return partial(ring_attention, group=None, causal=True, layout=SHARDED[contender])
    if contender == "ulysses-zigzag":
        return partial(ulysses_attention, group=None, causal=True, layout="zigzag")
    if contender == "rsa":
        return partial(rsa_attention, group=None, span=CAUSAL)
    if contender == "deepspeed-ulysses":
        return _deepspeed_attention()
    raise ValueError(f"unknown contender {contender!r}")


def rsa_footprint_gib(seq_len: int, world: int, shape: Shape) -> float:
    """RSA's score-sized memory per rank: the ``[B, H, N/P, N]`` probabilities and their gradient
    (both alive in backward) plus one ``[B, H, N/P, N/P]`` block product in flight."""
    s_local = seq_len // world
    return (2 + 1 / world) * 4 * shape.batch * shape.heads * s_local * seq_len / 1024**3


# ---------------------------------------------------------------------------------------- inputs


def _head_counts(shape: Shape) -> tuple[int, int, int, int]:
    return shape.heads, shape.kv_heads, shape.kv_heads, shape.heads  # q, k, v, grad of out


def sharded_inputs(shape: Shape, positions: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """q, k, v (leaves needing grad) and the output gradient, ``[B, S_local, H, D]``, at ``positions``."""
    tensors = [
        common.virtual_randn(shape.batch, h, shape.head_dim, positions, common.tensor_seed(seed, i))
        for i, h in enumerate(_head_counts(shape))
    ]
    return [t.requires_grad_() for t in tensors[:3]] + [tensors[3]]


def full_inputs_bhnd(shape: Shape, seq_len: int, seed: int) -> list[torch.Tensor]:
    """q, k, v and the output gradient for a single process, ``[B, H, N, D]``, made in place (a
    transposed copy of ``[B, N, H, D]`` would double the input peak)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape.batch, h, seq_len, shape.head_dim, generator=gen) for h in _head_counts(shape)]
    return [t.requires_grad_() for t in tensors[:3]] + [tensors[3]]


# ---------------------------------------------------------------------------------- correctness


def _reference_bshd(full: list[torch.Tensor]) -> list[torch.Tensor]:
    """float64 SDPA out, dq, dk, dv of full ``[B, N, H, D]`` inputs (the last is the out gradient)."""
    q, k, v = (x.double().transpose(1, 2).requires_grad_() for x in full[:3])
    out = _sdpa_bhnd(q, k, v)
    out.backward(full[3].double().transpose(1, 2))
    return [t.transpose(1, 2) for t in (out.detach(), q.grad, k.grad, v.grad)]


def check_sharded(contender: str, attn: AttnFn, shape: Shape, rank: int, world: int) -> None:
    """Assert ``attn`` on this rank's shards matches single-process SDPA (out and all gradients) at
    a small length; also that `sharded_inputs` builds exactly ``shard_sequence`` of the full tensor."""
    layout = SHARDED[contender]
    n = 64 * 2 * world  # divisible under every layout
    full = sharded_inputs(shape, torch.arange(n), CHECK_SEED)
    full = [x.detach() for x in full]
    local = [shard_sequence(x, group=None, dim=1, layout=layout) for x in full]
    direct = sharded_inputs(shape, layout_indices(n, world, rank, layout), CHECK_SEED)
    assert all(torch.equal(a, b.detach()) for a, b in zip(local, direct)), "sharded_inputs != shard_sequence(full)"
    q, k, v = (x.clone().requires_grad_() for x in local[:3])
    out = attn(q, k, v)
    out.backward(local[3])
    want = [shard_sequence(t.float(), group=None, dim=1, layout=layout) for t in _reference_bshd(full)]
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), want):
        err = (got - ref).abs().max().item()
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4), f"{contender} {name} differs from SDPA by {err:.2e}"


def check_single(attn: AttnFn, shape: Shape) -> None:
    """Assert a single-process ``[B, H, N, D]`` attention matches float64 SDPA at a small length."""
    full = [x.detach() for x in sharded_inputs(shape, torch.arange(256), CHECK_SEED)]
    q, k, v = (x.transpose(1, 2).clone().requires_grad_() for x in full[:3])
    out = attn(q, k, v)
    out.backward(full[3].transpose(1, 2))
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), _reference_bshd(full)):
        got = got.transpose(1, 2)
        assert torch.allclose(got, ref.float(), rtol=1e-3, atol=1e-4), f"{name} differs from SDPA"


# ------------------------------------------------------------------------------------ measurement


def fwd_bwd(attn: AttnFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> None:
    for t in (q, k, v):
        t.grad = None  # no accumulation: every iteration does the same work
    attn(q, k, v).backward(grad)


def time_steps(step: Callable[[], None], warmup: int, iters: int, barrier: Callable[[], None]) -> float:
    """Seconds per call of ``step`` after ``warmup`` untimed calls; ranks start the clock together."""
    for _ in range(warmup):
        step()
    barrier()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def sharded_rank(rank: int, world: int, spec: RunSpec) -> dict:
    """One rank of a distributed contender: check, build this rank's shards, time, report RSS."""
    attn = build_attention(spec.contender)
    check_sharded(spec.contender, attn, spec.shape, rank, world)
    positions = layout_indices(spec.seq_len, world, rank, SHARDED[spec.contender])
    q, k, v, grad = sharded_inputs(spec.shape, positions, spec.seed)
    common.reset_peak_rss()  # the peak reported is that of the timed work, not of the check above
    baseline = common.peak_rss_kib()
    seconds = time_steps(partial(fwd_bwd, attn, q, k, v, grad), spec.warmup, spec.iters, dist.barrier)
    return {"time_s": seconds, "baseline_kib": baseline, "peak_kib": common.peak_rss_kib()}


def single_rank(rank: int, world: int, spec: RunSpec) -> dict:
    """The one process of a single-process contender (``ideal`` or ``vanilla``)."""
    attn = build_attention(spec.contender)
    check_single(attn, spec.shape)
    q, k, v, grad = full_inputs_bhnd(spec.shape, spec.seq_len, spec.seed)
    common.reset_peak_rss()
    baseline = common.peak_rss_kib()
    seconds = time_steps(partial(fwd_bwd, attn, q, k, v, grad), spec.warmup, spec.iters, lambda: None)
    return {"time_s": seconds, "baseline_kib": baseline, "peak_kib": common.peak_rss_kib()}


@dataclass
class Measurement:
    """A contender at one length: ``time_s`` is None when it did not run (``note`` says why)."""

    contender: str
    seq_len: int
    time_s: float | None = None
    peak_gib: float | None = None
    delta_gib: float | None = None
    note: str = ""
    wall_s: float = 0.0


def measure(spec: RunSpec, world: int, threads: int, rss_cap_gib: float | None) -> Measurement:
    """Run ``spec`` in fresh processes: ``threads`` threads in one process for a single-process
    contender, else ``world`` one-thread gloo ranks. Time and peak RSS are maxima over ranks."""
    single = spec.contender in SINGLE
    cap = None if rss_cap_gib is None else int(rss_cap_gib * common.KIB_PER_GIB)
    start = time.monotonic()
    outcome = common.run_group(
        single_rank if single else sharded_rank,
        1 if single else world,
        (spec,),
        threads=threads if single else 1,
        distributed=not single,
        rss_cap_kib=cap,
    )
    m = Measurement(spec.contender, spec.seq_len, wall_s=time.monotonic() - start)
    if not outcome.ok:
        m.note = f"{outcome.status}: {outcome.detail.strip().splitlines()[0]}"
        m.peak_gib = common.gib(outcome.max_seen_rss_kib) or None
        print(f"[{spec.contender} N={spec.seq_len}] {outcome.status}\n{outcome.detail}", file=sys.stderr)
        return m
    rs = outcome.results
    m.time_s = max(r["time_s"] for r in rs)
    m.peak_gib = common.gib(max(r["peak_kib"] for r in rs))
    m.delta_gib = common.gib(max(r["peak_kib"] - r["baseline_kib"] for r in rs))
    return m


# ----------------------------------------------------------------------------------- timing mode


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def timing_table(results: list[Measurement]) -> str:
    ideal = {m.seq_len: m.time_s for m in results if m.contender == "ideal" and m.time_s}
    rows = []
    for m in results:
        eff = ideal[m.seq_len] / m.time_s if m.time_s and m.seq_len in ideal else None
        time_cell = _fmt(m.time_s, 3) if m.time_s is not None else m.note
        rows.append([m.contender, m.seq_len, time_cell, _fmt(eff), _fmt(m.peak_gib), _fmt(m.delta_gib)])
    headers = [
        "contender",
        "N",
        "time (s)",
        "efficiency (ideal/time)",
        "peak RSS/rank (GiB)",
        "RSS over inputs/rank (GiB)",
    ]
    return common.markdown_table(headers, rows)


def ring_verdicts(results: list[Measurement]) -> list[str]:
    """The targets: ring zigzag at >= 0.9 of ideal and no slower than DeepSpeed-Ulysses."""
    by = {(m.contender, m.seq_len): m.time_s for m in results}
    lines = []
    for n in sorted({m.seq_len for m in results}):
        ring, ideal, ds = by.get(("ring-zigzag", n)), by.get(("ideal", n)), by.get(("deepspeed-ulysses", n))
        if not ring:
            continue
        parts = []
        if ideal:
            eff = ideal / ring
            parts.append(f"efficiency {eff:.3f} ({'meets' if eff >= 0.9 else 'misses'} >= 0.9)")
        if ds:
            parts.append(f"{ds / ring:.2f}x DeepSpeed-Ulysses speed ({'meets' if ring <= ds else 'misses'} >= 1)")
        lines.append(f"- N={n}: ring-zigzag " + "; ".join(parts))
    return lines


def run_timing(args: argparse.Namespace, shape: Shape) -> None:
    world = args.world or 2
    cap = args.rss_cap_gib if args.rss_cap_gib is not None else 0.9 * common.mem_total_gib() / world
    contenders = args.contenders or list(TIMING_CONTENDERS)
    results = []
    for n in args.seq_lens:
        for c in contenders:
            if c == "rsa" and rsa_footprint_gib(n, world, shape) > args.rsa_max_gib:
                gb = rsa_footprint_gib(n, world, shape)
                results.append(Measurement(c, n, note=f"skipped (O(N^2/P) memory: {gb:.1f} GiB)"))
                continue
            m = measure(RunSpec(c, n, shape, args.warmup, args.iters, args.seed), world, world, cap)
            print(
                f"[{c} N={n}] time {_fmt(m.time_s, 3)} s, peak {_fmt(m.peak_gib)} GiB, wall {m.wall_s:.0f} s",
                file=sys.stderr,
            )
            results.append(m)
    print(
        f"\nCausal attention fwd+bwd, fp32, B={shape.batch} H={shape.heads} H_kv={shape.kv_heads} D={shape.head_dim}; "
        f"ideal: 1 process x {world} threads; others: {world} gloo ranks x 1 thread; "
        f"warmup {args.warmup}, iters {args.iters}; torch {torch.__version__}\n"
    )
    print(timing_table(results))
    verdicts = ring_verdicts(results)
    if verdicts:
        print("\n" + "\n".join(verdicts))


# ---------------------------------------------------------------------------------- max-seq mode


@dataclass
class Probe:
    seq_len: int
    fits: bool
    peak_gib: float | None
    wall_s: float
    compute_s: float | None
    delta_gib: float | None = None
    note: str = ""


@dataclass
class Search:
    """Probes of one contender; ``best`` is the longest N measured to fit, ``first_fail`` the
    shortest measured not to; ``cut_short`` when the time limit stopped the search."""

    contender: str
    probes: list[Probe] = field(default_factory=list)
    best: int = 0
    first_fail: int | None = None
    cut_short: bool = False


def probe(contender: str, n: int, world: int, shape: Shape, budget_gib: float) -> Probe:
    """One forward + backward at length ``n``; it fits when it completes with every rank's peak RSS
    within budget (ranks passing the budget are killed on the spot, so misses end early)."""
    spec = RunSpec(contender, n, shape, warmup=0, iters=1)
    m = measure(spec, world, 1, budget_gib)
    fits = m.time_s is not None and m.peak_gib <= budget_gib
    note = m.note or ("" if fits else "peak over budget")
    print(
        f"  probe {contender} N={n}: {'fits' if fits else 'no'} peak {_fmt(m.peak_gib)} GiB wall {m.wall_s:.0f} s",
        file=sys.stderr,
    )
    return Probe(n, fits, m.peak_gib, m.wall_s, m.time_s, m.delta_gib, note)


def _predicted_wall_s(done: list[Probe], n: int) -> float:
    """Wall time of a probe at ``n`` from the longest completed one: start-up cost stays, the
    compute grows as N^2 (attention dominates)."""
    ok = [p for p in done if p.compute_s is not None]
    if not ok:
        return 0.0
    last = max(ok, key=lambda p: p.seq_len)
    return (last.wall_s - last.compute_s) + last.compute_s * (n / last.seq_len) ** 2


def search_max_seq(run: Callable[[int], Probe], start: int, step: int, tol: float, deadline: float) -> Search:
    """Longest N (a multiple of ``step``) for which ``run(N).fits``: halve ``start`` until it fits,
    double until it does not, then bisect until the bracket is within ``tol`` of N. Stops early,
    marking ``cut_short``, when the next probe is predicted to end after ``deadline``."""
    s = Search("")

    def attempt(n: int) -> bool | None:
        if time.monotonic() + _predicted_wall_s(s.probes, n) > deadline:
            s.cut_short = True
            return None
        p = run(n)
        s.probes.append(p)
        if p.fits:
            s.best = max(s.best, n)
        else:
            s.first_fail = n if s.first_fail is None else min(s.first_fail, n)
        return p.fits

    n = max(step, start // step * step)
    fits = attempt(n)
    while fits is False and n > step:  # shrink until something fits
        n = max(step, n // 2 // step * step)
        fits = attempt(n)
    while fits and s.first_fail is None:  # grow until something does not
        n *= 2
        fits = attempt(n)
    while not s.cut_short and s.first_fail is not None and s.first_fail - s.best > max(step, tol * s.best):
        mid = (s.best + s.first_fail) // 2 // step * step
        if mid <= s.best:
            break
        attempt(mid)
    return s


def projected_max(s: Search, budget_gib: float, step: int) -> int | None:
    """The N where a straight line through the measured peak RSS of the longest completed probes
    meets the budget (memory of the distributed contenders is linear in N), kept inside the
    measured bracket."""
    pts = sorted((p.seq_len, p.peak_gib) for p in s.probes if p.compute_s is not None)
    pts = [(n, g) for n, g in pts if n >= pts[-1][0] / 8] if pts else []
    if len(pts) < 2:
        return None
    xs, ys = torch.tensor([float(n) for n, _ in pts]), torch.tensor([g for _, g in pts])
    slope = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
    if slope <= 0:
        return None
    n = int((budget_gib - (ys.mean() - slope * xs.mean())) / slope) // step * step
    if s.first_fail is not None:
        n = min(n, s.first_fail - step)
    return max(n, s.best)


def _probe_rows(searches: list[Search]) -> list[list]:
    rows = []
    for s in searches:
        for p in sorted(s.probes, key=lambda p: p.seq_len):
            fits = "yes" if p.fits else "no"
            rows.append([s.contender, p.seq_len, fits, _fmt(p.peak_gib), _fmt(p.delta_gib), f"{p.wall_s:.0f}", p.note])
    return rows


def _summary_row(s: Search, vanilla_n: int, world: int, budget_gib: float, step: int) -> list:
    distributed = s.contender != "vanilla"
    proj = projected_max(s, budget_gib, step) if s.cut_short and distributed else None
    ratio = f"{s.best / vanilla_n:.1f}" if vanilla_n and distributed else "-"
    proj_ratio = f"{proj / vanilla_n:.1f}" if proj and vanilla_n else "-"
    return [s.contender, world if distributed else 1, s.best, s.first_fail or "-", ratio, proj or "-", proj_ratio,
            "time limit" if s.cut_short else ""]  # fmt: skip


def maxseq_tables(searches: list[Search], budget_gib: float, world: int, step: dict[str, int]) -> str:
    """Every probe, then per contender the bracket found, the ratio to vanilla and any projection."""
    probe_headers = ["contender", "N", "fits", "peak RSS/rank (GiB)", "RSS over inputs/rank (GiB)", "wall (s)", "note"]
    vanilla_n = next((s.best for s in searches if s.contender == "vanilla"), 0)
    rows = [_summary_row(s, vanilla_n, world, budget_gib, step[s.contender]) for s in searches]
    headers = ["contender", "ranks", "longest N that fits", "shortest N that does not", "N / vanilla N",
               "projected longest N", "projected / vanilla", "search stopped by"]  # fmt: skip
    out = [common.markdown_table(probe_headers, _probe_rows(searches)), "", common.markdown_table(headers, rows)]
    ratios = [f"{r[0]} {r[4]}x measured" + (f", {r[6]}x projected" if r[6] != "-" else "") for r in rows if r[4] != "-"]
    if ratios:
        out.append(f"\nlsts N / vanilla N: {'; '.join(ratios)} (the seed paper reports ~40x on 4 GPUs)")
    return "\n".join(out)


def run_max_seq(args: argparse.Namespace, shape: Shape) -> None:
    world = args.world or 4
    deadline = time.monotonic() + args.time_limit
    contenders = args.contenders or list(MAXSEQ_CONTENDERS)
    # Vanilla first: it is cheap, and the distributed searches then share the remaining time.
    contenders = sorted(contenders, key=lambda c: c != "vanilla")
    # Lengths are multiples of 64, and of 2 * world so that every layout can shard them.
    step = {c: 64 if c in SINGLE else math.lcm(64, 2 * world) for c in contenders}
    searches = []
    for i, c in enumerate(contenders):
        share = (deadline - time.monotonic()) / (len(contenders) - i)
        print(f"[max-seq] {c}: {share:.0f} s of the time limit", file=sys.stderr)
        run = partial(probe, c, world=world, shape=shape, budget_gib=args.mem_gib)
        s = search_max_seq(run, args.start_seq, step[c], args.tolerance, time.monotonic() + share)
        s.contender = c
        searches.append(s)
    print(
        f"\nLongest causal attention fwd+bwd (fp32, B={shape.batch} H={shape.heads} H_kv={shape.kv_heads} "
        f"D={shape.head_dim}) within {args.mem_gib} GiB peak RSS per rank; distributed: {world} gloo ranks x 1 "
        f"thread; vanilla: 1 process x 1 thread; bracket tolerance {args.tolerance:.0%}; torch {torch.__version__}\n"
    )
    print(maxseq_tables(searches, args.mem_gib, world, step))


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536], help="timing mode: sequence lengths")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--world", type=int, default=None, help="ranks (and the ideal's threads); default 2, or 4 with --max-seq"
    )
    p.add_argument("--contenders", nargs="+", choices=(*TIMING_CONTENDERS, "vanilla"), default=None)
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    p.add_argument("--iters", type=int, default=1, help="timed iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rsa-max-gib", type=float, default=8.0, help="skip RSA where its score memory per rank exceeds this"
    )
    p.add_argument(
        "--rss-cap-gib", type=float, default=None, help="timing mode: kill a group when a rank passes this RSS"
    )
    p.add_argument("--max-seq", action="store_true", help="find the longest sequence that fits --mem-gib per rank")
    p.add_argument("--mem-gib", type=float, default=4.0, help="max-seq: peak RSS budget per rank")
    p.add_argument("--start-seq", type=int, default=2048, help="max-seq: first length probed")
    p.add_argument(
        "--tolerance", type=float, default=0.02, help="max-seq: stop bisecting when the bracket is this fraction of N"
    )
    p.add_argument("--time-limit", type=float, default=840.0, help="max-seq: seconds for the whole search")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = Shape(args.batch, args.heads, args.kv_heads, args.head_dim)
    if args.max_seq:
        run_max_seq(args, shape)
    else:
        run_timing(args, shape)


if __name__ == "__main__":
    main()
