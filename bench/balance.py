"""Attention work per rank of packed documents: whole-pack zigzag against the ``balanced`` layout.

    python bench/balance.py                 # the pair counts (exact, a few seconds)
    python bench/balance.py --time          # plus ring attention fwd+bwd time on 2 CPU ranks

Packs of ``--seq-len`` tokens (131072) drawn from a log-normal document-length distribution (median
2048, sigma ``--sigma``, each document at most ``--max-doc`` = 128K tokens; the last one cut to fit;
seed 0 + pack index). Under causal-within-document masking query p attends ``p - start(doc) + 1``
keys, so the work of a rank is the exact count of unmasked (query, key) pairs of the tokens it holds
(`lsts.parallel.balance.work_per_rank`). Imbalance = max / mean work per rank: the busiest rank
sets the step time. Beside zigzag and balanced, the table shows the plans balanced chooses from:
no document cut (greedy whole documents), every document cut head/tail into 2P chunks, and a middle
threshold, with the most contiguous runs a rank holds (each run pair is a ring tile).

``--time``: one ring attention forward + backward (fp32, 1 thread per rank, 2 ranks, torch backend)
on a pack of ``--time-seq-len`` tokens (the same distribution scaled down by its length), zigzag and
balanced, median of ``--iters``. Only meaningful on idle cores.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from _common import markdown_table, run_group

MEDIAN = 2048


def pack(seq_len: int, seed: int, sigma: float, max_doc: int, median: float = MEDIAN) -> tuple[int, ...]:
    """``cu_seqlens`` of one pack of ``seq_len`` tokens of log-normal document lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cu = [0]
    while cu[-1] < seq_len:
        length = int(min(max_doc, max(1, rng.lognormal(math.log(median), sigma))))
        cu.append(min(seq_len, cu[-1] + length))
    return tuple(cu)


def pair_counts(cu: tuple[int, ...], world: int) -> dict[str, tuple[float, int]]:
    """Per plan: (imbalance, most runs on a rank)."""
    import torch

    from lsts.parallel import layout_indices
    from lsts.parallel.balance import balanced_runs, imbalance, split_plan, work_per_rank

    n = cu[-1]
    zigzag = work_per_rank(cu, world, [layout_indices(n, world, r, "zigzag") for r in range(world)])
    out = {"zigzag (whole pack)": (imbalance(zigzag), 2)}
    for name, fraction in (("whole documents", math.inf), ("cut if > 1/16 rank", 1 / 16), ("cut every doc", 0.0)):
        runs, work = split_plan(cu, world, fraction)
        out[name] = (imbalance(work), max(len(r) for r in runs))
    runs = balanced_runs(cu, world)
    indices = [torch.cat([torch.arange(a, b) for a, b in rank_runs]) for rank_runs in runs]
    out["balanced"] = (imbalance(work_per_rank(cu, world, indices)), max(len(r) for r in runs))
    return out


def ring_time(rank: int, world: int, cu: tuple[int, ...], layout: str, iters: int) -> float:
    """Median seconds of one ring attention forward + backward on this rank's shard."""
    import torch
    import torch.distributed as dist

    from lsts.parallel import ring_attention, shard_sequence

    gen = torch.Generator().manual_seed(0)
    n = cu[-1]
    kw = dict(layout=layout, cu_seqlens=list(cu))
    q, k, v = (shard_sequence(torch.randn(1, n, 4, 64, generator=gen), **kw).requires_grad_() for _ in range(3))
    times = []
    for _ in range(iters + 1):  # the first one warms up
        dist.barrier()
        t0 = time.perf_counter()
        ring_attention(q, k, v, backend="torch", **kw).sum().backward()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--packs", type=int, default=8)
    p.add_argument("--sigma", type=float, default=1.5, help="log-normal sigma of the document lengths")
    p.add_argument("--max-doc", type=int, default=131072)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--time", action="store_true", help="also time ring attention fwd+bwd on 2 CPU ranks")
    p.add_argument("--time-seq-len", type=int, default=16384)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()

    packs = [pack(args.seq_len, seed, args.sigma, args.max_doc) for seed in range(args.packs)]
    docs = [len(cu) - 1 for cu in packs]
    print(f"{args.packs} packs of {args.seq_len} tokens, {min(docs)}-{max(docs)} documents each\n")
    rows = []
    for world in args.ranks:
        per_pack = [pair_counts(cu, world) for cu in packs]
        for name in per_pack[0]:
            values = [r[name][0] for r in per_pack]
            runs = max(r[name][1] for r in per_pack)
            rows.append(
                [world, name, f"{min(values):.3f}", f"{statistics.median(values):.3f}", f"{max(values):.3f}", runs]
            )
    headers = ["ranks", "layout / plan", "imbalance min", "median", "max", "most runs/rank"]
    print(markdown_table(headers, rows))

    if args.time:
        scale = args.time_seq_len / args.seq_len
        cu = pack(args.time_seq_len, 0, args.sigma, int(args.max_doc * scale), MEDIAN * scale)
        rows = []
        for layout in ("zigzag", "balanced"):
            out = run_group(ring_time, 2, (cu, layout, args.iters))
            if not out.ok:
                raise SystemExit(f"{layout}: {out.status}: {out.detail}")
            work = pair_counts(cu, 2)["zigzag (whole pack)" if layout == "zigzag" else "balanced"][0]
            rows.append([layout, args.time_seq_len, len(cu) - 1, f"{work:.3f}", f"{max(out.results):.3f}"])
        print(f"\nring attention fwd+bwd, 2 ranks x 1 thread, H=4, D=64, fp32, torch backend, median of {args.iters}\n")
        print(markdown_table(["layout", "N", "documents", "imbalance", "time (s)"], rows))


if __name__ == "__main__":
    main()
