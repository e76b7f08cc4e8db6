"""``launch/plan.py``: the planner's options on top of the trainer's, and its report."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lsts.config import load_config

GIB = 2**30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/plan.py",
        description="Predict per-rank memory, FLOPs, communication and step time of a training run "
        "(the trainer's options are taken as they are: --config, --section.field=value, --seq-len ...)",
        add_help=False,  # --help goes on to the trainer's options too
    )
    parser.add_argument("--nproc", type=int, default=1, help="ranks torchrun would launch (default 1)")
    parser.add_argument("--gpu", help="device: h100-80gb, h200-141gb, a100-80gb, a100-40gb (default: this CPU)")
    parser.add_argument("--search", action="store_true", help="list every layout that fits, fastest first")
    parser.add_argument("--budget-gib", type=float, help="memory per rank to fit in (default: the device's usable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _cpu_budget(nproc: int) -> float:
    """This machine's physical memory shared by the ranks, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / nproc


def plan(argv: list[str]) -> None:
    parser = _parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nTrainer options (launch/train.py --help):")
    args, rest = parser.parse_known_args(argv)
    if args.nproc < 1:
        raise ValueError(f"--nproc ({args.nproc}) must be >= 1")
    cfg = load_config(rest, world_size=args.nproc, description="launch/plan.py: the trainer's options")
    from lsts.planner.predict import DEVICES, predict

    if args.gpu is not None and args.gpu not in DEVICES:
        raise ValueError(f"unknown --gpu {args.gpu!r}; choose one of {sorted(DEVICES)}")
    if args.budget_gib is not None:
        budget = args.budget_gib * GIB
    elif args.gpu is not None:
        budget = DEVICES[args.gpu].memory_gib * DEVICES[args.gpu].usable * GIB
    else:
        budget = _cpu_budget(args.nproc)
    if args.search:
        from lsts.planner.search import search

        rows = search(cfg, args.nproc, args.gpu, budget)
        print(json.dumps({"budget_gib_per_rank": budget / GIB, "layouts": rows}) if args.json else _table(rows, budget))
        return
    prediction = predict(cfg, args.nproc, args.gpu)
    if args.json:
        print(json.dumps(prediction.to_json()))
    else:
        sys.stdout.write(report(prediction, budget))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def report(p, budget: float) -> str:
    """The prediction as text, one figure a line."""
    lay = p.layout
    degrees = " × ".join(f"{k} {lay[k]}" for k in ("cp_ring", "cp_ulysses", "tp", "pp", "dp_replicate", "dp_shard"))
    lines = [
        f"prediction for {p.device}, seq_len {lay['seq_len']}, {degrees}",
        f"  memory modes: checkpoint {lay['activation_checkpoint']}, offload {lay['activation_offload']}, "
        f"mlp tiles {lay['mlp_tile_tokens'] or 'off'}, loss chunk {lay['loss_chunk_size']}",
        f"peak per rank: {_gib(p.peak_bytes)} ({'fits' if p.peak_bytes <= budget else 'does NOT fit'} {_gib(budget)})",
    ]
    lines += [f"  {k:<16}{_gib(v):>14}" for k, v in p.memory.items()]
    buffers = _gib(p.comm_buffers_in_activations)
    lines.append(f"  ring / all-to-all receive buffers at their most: {buffers} (counted above)")
    if p.host_offload_bytes:
        lines.append(f"  offloaded to host memory: {_gib(p.host_offload_bytes)}")
    if p.layers:
        kept = sorted(set(p.layers.values()))
        lines.append("  activations kept per block: " + ", ".join(_gib(v) for v in kept))
    lines.append(f"FLOPs per step: {p.step_flops:.4g} (model, all ranks); {p.rank_flops:.4g} per rank with recompute")
    comm = ", ".join(f"{k} {_gib(v)}" for k, v in p.comm_bytes.items()) or "none"
    lines.append(f"sent per rank and step: {comm}")
    if p.step_time_s is not None:
        t = p.step_time_s
        lines.append(f"roofline step time: {t['step']:.3f} s (compute {t['compute']:.3f} s, comm {t['comm']:.3f} s)")
    return "\n".join(lines) + "\n"


def _table(rows: list[dict], budget: float) -> str:
    if not rows:
        return f"no layout fits {_gib(budget)} per rank\n"
    keys = ["cp_ring", "cp_ulysses", "tp", "pp", "dp_shard", "activation_checkpoint", "activation_offload",
            "mlp_tile_tokens", "loss_chunk_size"]  # fmt: skip
    headers = [*keys, "peak_gib", "step_s", "longest_seq_len"]
    cells = [[str(r["layout"][k]) for k in keys] + [f"{r['peak_gib']:.2f}", _seconds(r["step_s"]),
             str(r["longest_seq_len"])] for r in rows]  # fmt: skip
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(row, widths)) for row in [headers, *cells]]
    return f"layouts that fit {_gib(budget)} per rank, fastest first:\n" + "\n".join(lines) + "\n"


def _seconds(s) -> str:
    return "-" if s is None else f"{s:.3f}"
