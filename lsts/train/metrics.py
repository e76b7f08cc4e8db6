"""Per-step training metrics: ``<out>/metrics.jsonl``, TensorBoard under ``<out>/tb``, a progress
bar with ETA; and the numbers that go in them: peak memory, device peak FLOP/s, MFU, throughput.

Only rank 0 writes. Each metrics.jsonl line is one strict JSON object (non-finite floats become
``null``; TensorBoard still gets the NaN) holding at least ``step``, ``loss``, ``tokens_per_sec``,
``mem_gib``, ``grad_norm``, ``lr`` and ``mfu`` (``null`` where unknown). A line is flushed as it is
written, so a crashed process loses nothing it logged (a power loss may lose what the OS had not
written yet: there is no fsync per step).

Resume: the run directory holds one timeline, as its checkpoints do. A logger started at
``start_step`` first drops every jsonl line with a step after it (steps logged after the checkpoint
it resumed from, which will be logged again) and any torn last line, and tells TensorBoard to purge
events after it (``purge_step``). A fresh run (``start_step=0``) therefore starts an empty file.

MFU uses dense (no sparsity) 16-bit tensor-core peaks of known GPUs; float32 training reports no MFU,
since its peak depends on whether TF32 is enabled, and neither does a CPU.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

JSONL = "metrics.jsonl"
TB_DIR = "tb"
STANDARD_KEYS = ("loss", "tokens_per_sec", "mem_gib", "grad_norm", "lr", "mfu")

# Dense bf16/fp16 tensor-core FLOP/s from the vendors' data sheets (sparsity figures halved away).
# Each entry: name tokens that must all appear in `torch.cuda.get_device_name`; most specific first.
_PEAK_16BIT: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM
    (("H800",), 989e12),
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("H20",), 148e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
    (("A10",), 125e12),
)


class MetricsLogger:
    """Rank 0 logs each step to metrics.jsonl, TensorBoard, a `logging` INFO line (`step_line`:
    step, loss, throughput, memory, gradient norm, learning rate, ETA) and, when stderr is a
    terminal, a tqdm bar under those lines; other ranks do nothing.

    ``log(step, loss=..., lr=..., ...)`` takes any numbers (floats, ints, 0-d tensors); the standard
    keys missing from a call are written as ``null`` so that every line has the same columns.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int,
        total_steps: int,
        *,
        tensorboard: bool = True,
        jsonl: bool = True,
        progress_bar: bool = True,
        start_step: int = 0,
    ) -> None:
        self.active = rank == 0
        self._jsonl = self._tb = self._bar = None
        self.total_steps, self.start_step, self._t0 = total_steps, start_step, time.perf_counter()
        if not self.active:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if jsonl:
            truncate_jsonl(out / JSONL, start_step)
            self._jsonl = open(out / JSONL, "a")  # noqa: SIM115 -- held open for the run, closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard loads slowly

            self._tb = SummaryWriter(str(out / TB_DIR), purge_step=start_step + 1)
        if progress_bar:
            # disable=None: a bar on a terminal only; in a file its carriage returns would make one long line.
            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, disable=None
            )

    def log(self, step: int, **values: Any) -> None:
        if not self.active:
            return
        record = {"step": step, **dict.fromkeys(STANDARD_KEYS), **{k: _plain(v) for k, v in values.items()}}
        record["time"] = round(time.time(), 3)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, step)
        done = step - self.start_step
        eta = (time.perf_counter() - self._t0) / done * (self.total_steps - step) if done > 0 else None
        log.info(step_line(record, self.total_steps, eta))
        if self._bar is not None:
            self._bar.set_postfix(_postfix(record), refresh=False)
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        self._jsonl = self._tb = self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> None:
    """Keep only the lines of ``path`` with ``step <= last_step`` (and drop unparsable ones, such as
    a line torn by a crash). Rewritten through a temporary file, so a crash here loses nothing."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if step <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """0-d tensors and NumPy scalars to Python numbers, for JSON and TensorBoard alike."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # NumPy scalar
        return value.item()
    return value


def _json_safe(record: dict) -> dict:
    # Strict JSON has no NaN or Infinity; null keeps every line loadable by any JSON reader.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def step_line(record: dict, total_steps: int, eta_s: float | None) -> str:
    """``step 3/10 | loss 5.4321 | 12,345 tok/s | mem 2.31 GiB | grad norm 0.812 | lr 3.00e-04 | ETA
    0:01:23``; a value that is missing (``None``) is left out, and so is MFU where it is unknown."""
    parts = [f"step {record['step']}/{total_steps}"]
    formats = {
        "loss": "loss {:.4f}",
        "tokens_per_sec": "{:,.0f} tok/s",
        "mem_gib": "mem {:.2f} GiB",
        "grad_norm": "grad norm {:.3g}",
        "lr": "lr {:.2e}",
        "mfu": "mfu {:.1%}",
    }
    parts += [fmt.format(record[key]) for key, fmt in formats.items() if record.get(key) is not None]
    if eta_s is not None:
        parts.append(f"ETA {datetime.timedelta(seconds=round(eta_s))}")
    return " | ".join(parts)


def _postfix(record: dict) -> dict[str, str]:
    shown = {}
    if record.get("loss") is not None:
        shown["loss"] = f"{record['loss']:.4f}"
    if record.get("tokens_per_sec") is not None:
        shown["tok/s"] = f"{record['tokens_per_sec']:,.0f}"
    if record.get("mfu") is not None:
        shown["mfu"] = f"{record['mfu']:.1%}"
    return shown


# ---- measurements -------------------------------------------------------------------------------


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak memory of this rank in GiB: CUDA ``max_memory_allocated`` (tensors only, not the caching
    allocator's reserve) on a GPU; on CPU the process's peak resident set size, a high-water mark
    of the whole process (Python, libraries, every tensor) that never goes down."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return peak * scale / 2**30


def peak_flops_by_name(name: str, dtype: torch.dtype) -> float | None:
    """Dense 16-bit peak FLOP/s of the GPU called ``name`` (as CUDA reports it), or None if unknown."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    tokens = set(re.split(r"[\s\-_]+", name.upper()))
    for required, flops in _PEAK_16BIT:
        if tokens.issuperset(required):
            return flops
    return None


def device_peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one ``device`` computing in ``dtype``; None on CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device), dtype)


def mfu(flops_per_token: float, tokens_per_sec: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: the FLOP/s the model needs at the *global* throughput
    ``tokens_per_sec``, over the peak of ``n_devices`` devices; None where the peak is unknown."""
    if peak is None or peak <= 0 or n_devices <= 0:
        return None
    return flops_per_token * tokens_per_sec / (n_devices * peak)


__all__ = [
    "JSONL",
    "STANDARD_KEYS",
    "TB_DIR",
    "MetricsLogger",
    "device_peak_flops",
    "mfu",
    "peak_flops_by_name",
    "peak_memory_gib",
    "step_line",
    "truncate_jsonl",
]
