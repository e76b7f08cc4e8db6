"""Eager against ``train.compile=true``: trainer step time of the demo MASFormer on CPU.

    python bench/compile.py                      # 16384 tokens, 1 and 2 ranks, 20 steps each (~6 min)
    python bench/compile.py --seq-len 8192 --steps 4

Each run is ``torchrun launch/train.py``; the step time is the median of the steps after the first
two (the first ones include inductor's compilation), read back from ``metrics.jsonl``. The ratio
compares the two runs on the same cores, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _common import REPO_ROOT, markdown_table


def step_times(seq_len: int, steps: int, nproc: int, extra: list[str]) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(REPO_ROOT / "launch" / "train.py"), f"--seq-len={seq_len}", f"--steps={steps}", f"--out={out}",
            "--metrics.progress_bar=false", "--metrics.tensorboard=false", "--checkpoint.every=0", *extra,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    return [seq_len / r["tokens_per_sec"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", default="1,2", help="comma-separated rank counts")
    args = ap.parse_args()
    rows = []
    for nproc in (int(n) for n in args.nproc.split(",")):
        eager = statistics.median(step_times(args.seq_len, args.steps, nproc, [])[2:])
        compiled = statistics.median(step_times(args.seq_len, args.steps, nproc, ["--train.compile=true"])[2:])
        attention = "local (fullgraph)" if nproc == 1 else f"ring cp={nproc}"
        rows.append([nproc, attention, f"{eager:.2f}", f"{compiled:.2f}", f"{eager / compiled:.2f}x"])
    print(markdown_table(["ranks", "attention", "eager s/step", "compiled s/step", "speed-up"], rows))


if __name__ == "__main__":
    main()
