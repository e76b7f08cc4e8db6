"""Train a MASFormer language model on long sequences.

    torchrun --nproc-per-node 2 launch/train.py --seq-len 131072
    python launch/train.py --config configs/demo.yaml --steps 10 --out runs/try --print-config

Options: ``--help``. Any config field is ``--section.field=value``; the YAML files in ``configs/``
are runnable as they are. A mistake is one ``error:`` line per failing check (``--debug`` shows its
traceback); progress, checkpoints and the resume decision are logged on rank 0.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lsts.cli import launch_world_size, run, setup_logging
from lsts.config import load_config


def _train(argv: list[str]) -> None:
    cfg = load_config(argv, world_size=launch_world_size())  # --help and config mistakes end here, before torch
    setup_logging(cfg.metrics.all_ranks)
    from lsts.train.trainer import train

    train(cfg)


def main(argv: list[str] | None = None) -> None:
    run(_train, argv)


if __name__ == "__main__":
    main()
