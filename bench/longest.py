"""The longest sequence one full training step (forward, backward, optimizer) of a Llama-shaped
model runs on 2 gloo ranks within a memory budget per rank: lsts defaults, lsts with its memory
passes, DeepSpeed ALST, and the planner's prediction for the lsts rows.

    python bench/longest.py                                   # 2 GiB per rank, dim 512, 4 layers: ~30 min
    python bench/longest.py --budget-gib 4 --layers 8         # the issue's shape: far longer on 2 cores
    python bench/longest.py --contenders lsts-tiled --no-planner
    python bench/longest.py --contenders lsts-tiled --lengths 56320 --no-planner   # one probe, no search

Every probe is one fresh ``torchrun --nproc-per-node 2`` under ``bench/_rss_guard.py``, which
aborts a rank the moment its peak resident set (``VmHWM``) passes the budget; a probe fits when the
step finished and no rank passed it. The search (``bench/attention.py: search_max_seq``) doubles the
length from ``--start-seq`` until a probe does not fit, then bisects down to ``--granularity``.

Contenders (one at a time, the same model: ``--dim`` / ``--layers`` / ``--heads`` / ``--kv-heads``,
SwiGLU ``--ffn-dim``, vocabulary ``--vocab``, untied output, every layer full causal attention, fp32):

* ``lsts``: ``launch/train.py --steps 1`` with the trainer's defaults (ring context parallelism
  over the 2 ranks, zigzag; FSDP2; no checkpointing; loss chunk 4096).
* ``lsts-tiled``: the same with full activation checkpointing, feed-forward tiles of
  ``--tile-tokens`` tokens and loss chunks of as many. Activation offload is left off: on a CPU
  its "host memory" is the same resident set, so it cannot lower the figure measured here.
* ``alst``: DeepSpeed's Arctic Long Sequence Training on the same model as a Hugging Face
  ``LlamaForCausalLM`` built from a config, Ulysses over the 2 ranks (``bench/_alst_step.py``).

The trainer's forced checkpoint after its last step is skipped (``--no-final-checkpoint`` of the
guard): the budget is the training step's. The planner rows are `lsts.planner.search.longest_sequence`
for the two lsts configurations (a trace at two lengths, an affine fit, verified by tracing the answer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common  # first: puts the repository root on sys.path
from attention import Probe, Search, search_max_seq

GUARD = common.REPO_ROOT / "bench" / "_rss_guard.py"
CONTENDERS = ("lsts", "lsts-tiled", "alst")
WORLD = 2


def trainer_args(args: argparse.Namespace, contender: str) -> list[str]:
    """The trainer's options for ``contender`` (without the sequence length)."""
    model = [
        f"--model.vocab_size={args.vocab}", f"--model.dim={args.dim}", f"--model.n_layers={args.layers}",
        f"--model.n_heads={args.heads}", f"--model.n_kv_heads={args.kv_heads}", f"--model.ffn_dim={args.ffn_dim}",
        "--model.full_layers=all", "--model.tie_embeddings=false",
        "--metrics.progress_bar=false", "--metrics.tensorboard=false",
    ]  # fmt: skip
    if contender == "lsts-tiled":
        model += [
            "--parallel.activation_checkpoint=full", f"--parallel.mlp_tile_tokens={args.tile_tokens}",
            f"--kernels.loss_chunk_size={args.tile_tokens}",
        ]  # fmt: skip
    return model


def command(args: argparse.Namespace, contender: str, seq_len: int, report: Path, out: Path) -> list[str]:
    guard = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(GUARD),
        f"--budget-gib={args.budget_gib}", f"--report={report}",
    ]  # fmt: skip
    if contender == "alst":
        shape = [f"--dim={args.dim}", f"--layers={args.layers}", f"--heads={args.heads}",
                 f"--kv-heads={args.kv_heads}", f"--ffn-dim={args.ffn_dim}", f"--vocab={args.vocab}"]  # fmt: skip
        return [*guard, "--", str(common.REPO_ROOT / "bench" / "_alst_step.py"), f"--seq-len={seq_len}", *shape]
    train = [str(common.REPO_ROOT / "launch" / "train.py"), f"--seq-len={seq_len}", "--steps=1", f"--out={out}"]
    return [*guard, "--no-final-checkpoint", "--", *train, *trainer_args(args, contender)]


def read_reports(report: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]


def probe(args: argparse.Namespace, contender: str, seq_len: int) -> Probe:
    """One training step at ``seq_len``; fits when it finished with every rank within the budget."""
    tmp = Path(tempfile.mkdtemp(prefix="lsts-longest-"))
    try:
        cmd = command(args, contender, seq_len, tmp / "report", tmp / "out")
        t0 = time.monotonic()
        done = subprocess.run(cmd, cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=args.probe_timeout)
        wall = time.monotonic() - t0
        reports = read_reports(tmp / "report")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak = max((r["peak_gib"] for r in reports), default=None)
    over = any(r["over_budget"] for r in reports)
    fits = done.returncode == 0 and len(reports) == WORLD and not over
    note = "over budget (aborted)" if over else ""
    if not fits and not over:
        # Anything but the watchdog: a real failure, which the table must show, not count as "too long".
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if "Error" in ln or "error" in ln]
        note = f"error (exit {done.returncode}): {lines[-1].strip() if lines else 'no message'}"
        sys.stderr.write(done.stderr[-4000:])
    print(f"  {contender} N={seq_len}: {'fits' if fits else 'no'}, peak {peak} GiB, {wall:.0f} s {note}",
          file=sys.stderr, flush=True)  # fmt: skip
    return Probe(seq_len, fits, peak, wall, wall, note=note)


def search(args: argparse.Namespace, contender: str) -> Search:
    s = search_max_seq(
        lambda n: probe(args, contender, n), args.start_seq, args.granularity, 0.0,
        time.monotonic() + args.time_limit,
    )  # fmt: skip
    s.contender = contender
    return s


def planner_longest(args: argparse.Namespace, contender: str) -> int:
    """The planner's longest sequence for ``contender`` within the budget (`longest_sequence`)."""
    from lsts.config import load_config
    from lsts.parallel.dims import ParallelDims
    from lsts.planner.predict import measure_baseline
    from lsts.planner.search import longest_sequence

    cfg = load_config([f"--seq-len={args.start_seq}", *trainer_args(args, contender)], world_size=WORLD)
    baseline = measure_baseline(cfg, ParallelDims.from_config(cfg.parallel, WORLD))
    return longest_sequence(cfg, WORLD, None, args.budget_gib * 2**30, baseline, verify=True)


def tables(searches: list[Search], predicted: dict[str, int]) -> str:
    probes = [
        [s.contender, p.seq_len, "yes" if p.fits else "no", "-" if p.peak_gib is None else f"{p.peak_gib:.2f}",
         f"{p.wall_s:.0f}", p.note]
        for s in searches for p in sorted(s.probes, key=lambda p: p.seq_len)
    ]  # fmt: skip
    rows = []
    for s in searches:
        guess = predicted.get(s.contender)
        bounded = s.first_fail is not None  # else the longest that fits is only a lower bound
        err = f"{(guess - s.best) / s.best:+.1%}" if guess and s.best and bounded else "-"
        best = (s.best if bounded else f">= {s.best}") if s.best else "none"
        stopped = "time limit" if s.cut_short else ("lengths given" if not bounded else "")
        rows.append([s.contender, best, s.first_fail or "-", guess or "-", err, stopped])
    headers = ["contender", "longest N that fits", "shortest N that does not", "planner's longest N",
               "planner error", "search stopped by"]  # fmt: skip
    probe_headers = ["contender", "N", "fits", "peak RSS/rank (GiB)", "wall (s)", "note"]
    return common.markdown_table(probe_headers, probes) + "\n\n" + common.markdown_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--budget-gib", type=float, default=2.0, help="peak RSS per rank")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn-dim", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tile-tokens", type=int, default=1024, help="lsts-tiled: feed-forward tile and loss chunk")
    p.add_argument("--start-seq", type=int, default=4096)
    p.add_argument("--granularity", type=int, default=1024, help="lengths probed are multiples of this")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds per contender's search")
    p.add_argument("--probe-timeout", type=float, default=900.0, help="seconds per probe")
    p.add_argument("--lengths", type=int, nargs="+", help="probe these lengths only, no search")
    p.add_argument("--no-planner", action="store_true", help="skip the planner's predictions")
    p.add_argument("--json", type=Path, help="also write the probes and predictions here")
    args = p.parse_args(argv)
    if any(n % (2 * WORLD) for n in args.lengths or []):
        raise SystemExit(f"--lengths must be multiples of {2 * WORLD} (zigzag over {WORLD} ranks)")
    if args.granularity % (2 * WORLD) or args.start_seq % args.granularity:
        raise SystemExit(f"--granularity must be a multiple of {2 * WORLD} (zigzag) and divide --start-seq")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    predicted = {}
    if not args.no_planner:
        for c in (c for c in args.contenders if c.startswith("lsts")):
            t0 = time.monotonic()
            predicted[c] = planner_longest(args, c)
            print(f"  planner {c}: {predicted[c]} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    if args.lengths:
        searches = [Search(c, [probe(args, c, n) for n in args.lengths]) for c in args.contenders]
        for s in searches:
            s.best = max((p.seq_len for p in s.probes if p.fits), default=0)
            s.first_fail = min((p.seq_len for p in s.probes if not p.fits and p.seq_len > s.best), default=None)
    else:
        searches = [search(args, c) for c in args.contenders]
    print(
        f"\nLongest sequence of one training step within {args.budget_gib} GiB peak RSS per rank, {WORLD} gloo ranks; "
        f"Llama shape dim {args.dim}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, ffn {args.ffn_dim}, "
        f"vocab {args.vocab}, fp32; granularity {args.granularity}\n"
    )
    print(tables(searches, predicted))
    if args.json:
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "predicted": predicted,
               "searches": [{"contender": s.contender, "best": s.best, "first_fail": s.first_fail,
                             "probes": [vars(p) for p in s.probes]} for s in searches]}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
