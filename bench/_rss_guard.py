"""A per-rank memory budget for ``bench/longest.py``: run a script under a watchdog thread that
aborts the process as soon as its peak resident set passes the budget.

    torchrun --nproc-per-node 2 bench/_rss_guard.py --budget-gib 2 --report DIR -- SCRIPT [ARGS...]

The thread reads ``VmHWM`` (the kernel's high-water mark of the resident set) from
``/proc/self/status`` every ``POLL_S``: a spike shorter than the period is still seen, one period
late. Over budget it writes ``DIR/rank<r>.json`` with ``"over_budget": true``, prints one line to
stderr and ends the process with `EXIT_OVER_BUDGET` (torchrun then stops the other ranks). A run that
finishes writes the same file with its peak. ``--no-final-checkpoint``: the trainer's forced save
after its last step is skipped, so that the budget is the training step's alone.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path

EXIT_OVER_BUDGET = 75
POLL_S = 0.02
KIB_PER_GIB = 1024**2


def peak_rss_kib() -> int:
    """This process's peak resident set (``VmHWM``), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line: the RSS guard needs Linux")


def _write_report(report: Path, rank: int, peak_kib: int, over: bool) -> None:
    report.mkdir(parents=True, exist_ok=True)
    tmp = report / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "peak_gib": peak_kib / KIB_PER_GIB, "over_budget": over}))
    tmp.rename(report / f"rank{rank}.json")


def start_watchdog(budget_gib: float, report: Path, rank: int, exit=os._exit) -> threading.Thread:
    """Start the daemon thread that ends the process (``exit(EXIT_OVER_BUDGET)``) once its peak RSS
    passes ``budget_gib``, after writing ``report/rank<rank>.json``."""
    budget_kib = budget_gib * KIB_PER_GIB

    def watch() -> None:
        while True:
            peak = peak_rss_kib()
            if peak > budget_kib:
                _write_report(report, rank, peak, over=True)
                sys.stderr.write(
                    f"[rss guard] rank {rank}: peak RSS {peak / KIB_PER_GIB:.3f} GiB is over the budget of "
                    f"{budget_gib} GiB per rank; aborting the rank (exit {EXIT_OVER_BUDGET})\n"
                )
                sys.stderr.flush()
                exit(EXIT_OVER_BUDGET)
                return
            time.sleep(POLL_S)

    thread = threading.Thread(target=watch, name="rss-guard", daemon=True)
    thread.start()
    return thread


def _skip_final_checkpoint() -> None:
    from lsts.train.checkpoint import Checkpointer

    Checkpointer.maybe_save = lambda self, *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-gib", type=float, required=True)
    parser.add_argument("--report", type=Path, required=True, help="directory for rank<r>.json")
    parser.add_argument("--no-final-checkpoint", action="store_true")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    start_watchdog(args.budget_gib, args.report, rank)
    # A run that ends (normally or by an exception) reports its peak too; `os._exit` skips this.
    budget_kib = args.budget_gib * KIB_PER_GIB
    atexit.register(lambda: _write_report(args.report, rank, peak := peak_rss_kib(), over=peak > budget_kib))
    if args.no_final_checkpoint:
        _skip_final_checkpoint()
    sys.argv = [args.script, *args.args]
    # The repository root replaces bench/ as the first import path, as `python <script>` would have it.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
