"""Predict a training run's memory, FLOPs, communication and step time per rank before launching it.

    python launch/plan.py --config configs/llama3-8b-128k-8gpu.yaml --nproc 8 --gpu h100-80gb
    python launch/plan.py --nproc 2 --seq-len 32768 --json        # this machine's CPU run of the same command
    python launch/plan.py --config configs/llama3-8b-128k-8gpu.yaml --nproc 8 --gpu h100-80gb --search

Takes the trainer's options (``--config``, any ``--section.field=value``, ``--seq-len`` ...) plus
``--nproc`` (the ranks torchrun would launch), ``--gpu`` (a device name; without it, this CPU),
``--search`` (every layout and memory mode of the world that fits, fastest first, with the longest
sequence each admits), ``--budget-gib`` (per rank; default the device's usable memory, on CPU this
machine's memory over the ranks) and ``--json``. The memory is traced from the real model on fake
tensors (`lsts.planner`); see docs/benchmarks.md for how well it matches.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lsts.cli import run, setup_logging
from lsts.planner.cli import plan


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run(plan, argv)


if __name__ == "__main__":
    main()
