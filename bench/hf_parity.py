"""The Hugging Face architecture matrix: lsts attention against ``eager`` on tiny random models of
every architecture in `tests.hf_models.TINY_ARCHS`, as the parity tests measure it.

    python bench/hf_parity.py > /tmp/table.md   # the table of docs/hf_models.md

Prints a markdown table: the relative error of the logits and of the worst parameter gradient
(fp32) on plain, left-padded and packed rows, and what each tiny config switches on.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repository root instead of bench/: tests/ and lsts/ import from there.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import lsts.models.hf  # noqa: E402  (registers attn_implementation="lsts")
from tests.hf_models import TINY_ARCHS, parity_errors  # noqa: E402

MODES = ("plain", "left_padded", "packed")


def main() -> None:
    print(f"| architecture | config fields set | {' | '.join(f'{m} logits / grad' for m in MODES)} |")
    print(f"|---|---|{'---|' * len(MODES)}")
    for arch in sorted(TINY_ARCHS):
        cells = []
        for mode in MODES:
            try:
                e = parity_errors(arch, mode)
                cells.append(f"{e['logits']:.1e} / {e['grad']:.1e}")
            except Exception as exc:  # a row that cannot run says why instead of ending the table
                cells.append(f"error: {type(exc).__name__}: {str(exc)[:60]}")
        config = ", ".join(TINY_ARCHS[arch]) or "defaults"
        print(f"| {arch} | {config} | {' | '.join(cells)} |")
    print(f"\ntransformers {__import__('transformers').__version__}, lsts {lsts.__version__}")


if __name__ == "__main__":
    main()
