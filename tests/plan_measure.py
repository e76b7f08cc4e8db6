"""Run ``launch/train.py`` under torchrun with every sequence-parallel byte counted (the bench's
`count_sent_bytes`), and write rank 0's count and ``mem_gib`` to a JSON file:

    torchrun --nproc-per-node 2 tests/plan_measure.py OUT.json --steps 1 --seq-len 8192 ...
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

from _common import count_sent_bytes  # noqa: E402 - bench/ is a directory of scripts

from launch.train import main  # noqa: E402


def _measure(out: str, argv: list[str]) -> None:
    sent = count_sent_bytes()
    main(argv)
    if os.environ.get("RANK", "0") == "0":
        with open(out, "w") as f:
            json.dump({"sent": sent[0]}, f)


if __name__ == "__main__":
    _measure(sys.argv[1], sys.argv[2:])
