"""Fine-tune a Hugging Face decoder for long context with a recipe of `lsts.finetune.methods`:
LongLoRA, SinkLoRA, LoRA, full or SPT.

    torchrun --nproc-per-node 2 launch/finetune.py --model DIR --method longlora --seq-len 8192 --steps 2 --out X
    python launch/finetune.py --model DIR --method sinklora --config configs/finetune-llama-8k.yaml --print-config

Writes X/metrics.jsonl, X/tb, X/checkpoints (resume with --resume) and X/merged, which plain
``AutoModelForCausalLM.from_pretrained`` loads and runs at the new length. Options: ``--help``; any
config field is ``--section.field=value``. A mistake is one ``error:`` line per failing check
(``--debug`` shows its traceback).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lsts.cli import launch_world_size, run, setup_logging
from lsts.finetune.config import load_finetune_config


def _finetune(argv: list[str]) -> None:
    cfg = load_finetune_config(argv, launch_world_size())  # --help and config mistakes end here, before torch
    setup_logging(cfg.metrics.all_ranks)
    from lsts.finetune.trainer import finetune

    finetune(cfg)


def main(argv: list[str] | None = None) -> None:
    run(_finetune, argv)


if __name__ == "__main__":
    main()
