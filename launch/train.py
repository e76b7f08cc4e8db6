"""Train a MASFormer language model on long sequences.

    torchrun --nproc-per-node 2 launch/train.py --seq-len 131072
    python launch/train.py --config configs/demo.yaml --steps 10 --out runs/try --print-config

Options: ``--help``. Any config field is ``--section.field=value``; the YAML files in ``configs/``
are runnable as they are.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lsts.train.trainer import main

if __name__ == "__main__":
    main()
