"""The resident memory of a CPU training process before its first tensor: measured, not guessed.

On CPU the trainer logs the process's peak resident set (``ru_maxrss``) as ``mem_gib``: Python,
torch and its libraries, the tokenized corpus and TensorBoard's writer count as much as the
tensors. `measure` runs what `lsts.train.trainer.train` does before building the model (imports,
a gloo process group, rank 0's data loader and first batch, the TensorBoard writer) in a fresh
subprocess and reports two figures: ``rss`` after it (what the tensors add to) and ``peak`` during
it (tokenizing the corpus can pass through more than it keeps). Results are cached per Python,
torch, lsts source tree and data configuration, so a planner call costs the seconds once.

    python -m lsts.planner.baseline '{"data": {...}, "vocab_size": 256, "dp": 1, "cp": 2, ...}'
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lsts


def _rss_bytes() -> int:
    """This process's resident set now (Linux ``/proc``; elsewhere the peak stands in)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_bytes()


def _peak_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _probe(spec: dict) -> dict:
    """The trainer's start-up on rank 0, as far as it allocates no model tensor."""
    import tempfile

    import torch.distributed as dist

    import lsts.train.trainer  # noqa: F401 - the trainer's imports are part of its resident set
    from lsts.config import DataConfig
    from lsts.train.data import build_data

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    data = DataConfig(**spec["data"])
    loader = build_data(data, dp_rank=0, dp_world=spec["dp"], cp_rank=0, cp_world=spec["cp"], layout=spec["layout"],
                        vocab_size=spec["vocab_size"])  # fmt: skip
    next(iter(loader))
    if spec["tensorboard"]:
        from torch.utils.tensorboard import SummaryWriter

        with tempfile.TemporaryDirectory() as tmp:
            SummaryWriter(tmp).close()
    return {"rss": _rss_bytes(), "peak": _peak_bytes()}


def _cache_key(spec: dict) -> str:
    import torch

    src = Path(lsts.__file__).parent
    newest = max(p.stat().st_mtime_ns for p in src.rglob("*.py"))
    text = json.dumps([sys.executable, torch.__version__, str(src), newest, spec], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lsts" / "plan"


def measure(spec: dict, cache: bool = True) -> dict:
    """``{"rss": bytes, "peak": bytes}`` of the trainer's start-up for ``spec`` (see the module)."""
    path = _cache_dir() / f"baseline-{_cache_key(spec)}.json"
    if cache and path.is_file():
        return json.loads(path.read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lsts.__file__).parent.parent), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "lsts.planner.baseline", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise ValueError(f"measuring the trainer's start-up memory failed:\n{done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
