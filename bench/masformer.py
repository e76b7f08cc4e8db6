"""MASFormer against an all-full-attention model: trainer step time at long sequences, and the bytes
a window layer moves under context parallelism with the halo exchange against the ring.

    python bench/masformer.py                       # 131072 tokens, 2 ranks, the demo model
    python bench/masformer.py --seq-len 16384 --steps 2

Step time: ``torchrun launch/train.py`` twice on the same cores, the demo MASFormer (one full layer
in four, the others a 1024-token window) and the same model with every layer full; the step time is
read back from ``metrics.jsonl`` (the last step's, so the first step's warm-up does not count).

Bytes: one window layer's attention forward + backward on 2 gloo ranks (zigzag), counting the
elements every rank sends, once with the halo exchange and once forced round the ring.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _common import REPO_ROOT, count_sent_bytes, markdown_table, run_group


def train_step_time(seq_len: int, steps: int, nproc: int, extra: list[str]) -> dict:
    """Run the trainer; return its last metrics line."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(REPO_ROOT / "launch" / "train.py"), f"--seq-len={seq_len}", f"--steps={steps}", f"--out={out}",
            "--metrics.progress_bar=false", "--metrics.tensorboard=false", "--checkpoint.every=0", *extra,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f][-1]


def window_layer_bytes(rank: int, world: int, seq_len: int, window: int, force_ring: bool) -> int:
    """Bytes this rank sends for one window layer's attention forward + backward (fp32 K/V with the
    demo model's 2 K/V heads of dim 16)."""
    import torch

    from lsts.kernels.attention import Span
    from lsts.parallel import ring_attention, shard_sequence

    sent = count_sent_bytes(force_ring)
    q = shard_sequence(torch.randn(1, seq_len, 4, 16), layout="zigzag").requires_grad_()
    kv = shard_sequence(torch.randn(1, seq_len, 2, 16), layout="zigzag").requires_grad_()
    ring_attention(q, kv, kv, span=Span("window", window), backend="torch").sum().backward()
    return sent[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--steps", type=int, default=2, help="trainer steps per run; the last one is timed")
    p.add_argument("--nproc", type=int, default=2, help="ranks (context-parallel ring degree)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--skip-step-time", action="store_true", help="only count the bytes")
    args = p.parse_args()

    common = [f"--parallel.cp_ring={args.nproc}", f"--model.span_size={args.window}"]
    print(f"MASFormer demo model (4 layers, dim 64, 4 heads, 2 K/V heads), N={args.seq_len}, {args.nproc} ranks\n")
    if not args.skip_step_time:
        rows = []
        for name, extra in [
            ("MASFormer: 1 full in 4, window", ["--model.full_layers=top", "--model.n_full=1"]),
            ("all layers full", ["--model.full_layers=all"]),
        ]:
            m = train_step_time(args.seq_len, args.steps, args.nproc, common + extra)
            rows.append([name, f"{m['step_time_s']:.1f}", f"{m['tokens_per_sec']:.0f}", f"{m['mem_gib']:.2f}"])
            print(f"[{name}] {rows[-1]}", flush=True)
        speedup = float(rows[1][1]) / float(rows[0][1])
        print(markdown_table(["model", "step time (s)", "tokens/s", "peak mem/rank (GiB)"], rows))
        print(f"\nMASFormer is {speedup:.2f}x faster per step than all-full attention\n")

    sent = {}
    for mode in ("halo", "ring"):
        out = run_group(window_layer_bytes, args.nproc, (args.seq_len, args.window, mode == "ring"))
        if not out.ok:
            raise SystemExit(f"{mode}: {out.status}: {out.detail}")
        sent[mode] = out.results
    rows = [[m, *(f"{b / 2**20:.3f}" for b in sent[m])] for m in ("halo", "ring")]
    print(markdown_table(["window layer fwd+bwd", *(f"MiB sent by rank {r}" for r in range(args.nproc))], rows))
    print(f"\nhalo / ring bytes: {sum(sent['halo']) / sum(sent['ring']):.5f} (window {args.window}, N {args.seq_len})")


if __name__ == "__main__":
    main()
