"""bf16 errors of lsts' ring / Ulysses / hybrid attention against single-process PyTorch SDPA at bf16,
as ``tests/test_bf16_accuracy.py`` measures them (causal, GQA 8/2, packed documents, 64 tokens).

    python bench/compat_errors.py > /tmp/table.md   # the table of docs/coming_from.md

Each cell: the relative L2 error of lsts against a float64 oracle on seed 0, and its ratio to SDPA's
error on the same inputs; the last column is the worst ratio of the row over ``--seeds`` seeds.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

# The repository root instead of bench/: tests/ and lsts/ import from there.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from tests.bf16_errors import CU, NAMES, SHAPE, lsts_rank, relative, sdpa_errors  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402

CASES = [(2, "ring"), (2, "ulysses"), (4, "ring"), (4, "ulysses"), (4, "hybrid-u2")]
METHODS = {"ring": "ring (zigzag)", "ulysses": "Ulysses (contiguous)", "hybrid-u2": "hybrid U=2 × R=2 (zigzag)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the worst-ratio column")
    seeds = range(parser.parse_args().seeds)
    sdpa = {seed: sdpa_errors(seed) for seed in seeds}
    print(f"| method | world | {' | '.join(NAMES)} | worst ratio, {len(seeds)} seeds |")
    print(f"|---|---:|{'---:|' * len(NAMES)}---:|")
    print(f"| single-process SDPA | 1 | {' | '.join(f'{sdpa[0][n]:.2e}' for n in NAMES)} | 1 |")
    for world, method in CASES:
        errs = {seed: relative(run_ranks(lsts_rank, world, method, seed)) for seed in seeds}
        cells = [f"{errs[0][n]:.2e} ({errs[0][n] / sdpa[0][n]:.2f}×)" for n in NAMES]
        worst = max(errs[s][n] / sdpa[s][n] for s in seeds for n in NAMES)
        print(f"| {METHODS[method]} | {world} | {' | '.join(cells)} | {worst:.2f} |")
    shape = ", ".join(f"{k}={v}" for k, v in SHAPE.items())
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    print(f"\n{day}, torch {torch.__version__} (CPU, gloo), bf16, causal, {shape}, cu_seqlens={CU}")


if __name__ == "__main__":
    main()
