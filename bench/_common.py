"""Shared helpers of the benchmarks in ``bench/``: fresh-process rank groups, peak RSS, inputs that
never exist in full on a rank, and markdown tables.

Every measurement runs in freshly spawned processes, so a process's peak RSS (``ru_maxrss``)
belongs to one contender alone. The parent watches each child's resident set and kills the group
when one passes a cap: an over-budget candidate ends early instead of swapping or taking the shared
machine down.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# `python bench/x.py` puts bench/ on sys.path, not the repository root; lsts must import without an install.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402  (after the sys.path fix, so that spawned children resolve lsts the same way)

KIB_PER_GIB = 1024**2
POLL_S = 0.05  # RSS watchdog period: short enough that an over-budget rank rarely gets far past the cap


# --------------------------------------------------------------------------------------------- RSS


def peak_rss_kib() -> int:
    """This process's peak resident set so far (KiB: Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Restart ``ru_maxrss`` from the current resident set (Linux >= 4.0, ``clear_refs`` 5), so that
    a later peak excludes set-up work such as correctness checks. False where it is not allowed:
    the peak then stays the lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def current_rss_kib(pid: int) -> int | None:
    """Resident set of a live process from ``/proc`` (KiB), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def gib(kib: float) -> float:
    return kib / KIB_PER_GIB


def mem_total_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


# -------------------------------------------------------------------------------------- rank groups


@dataclass
class GroupOutcome:
    """What a spawned group returned: ``results`` in rank order when ``status == "ok"``; otherwise
    ``status`` is ``"over cap"``, ``"error"`` or ``"timeout"`` and ``detail`` says more."""

    status: str
    results: list[Any] = field(default_factory=list)
    detail: str = ""
    max_seen_rss_kib: int = 0  # the watchdog's largest sample, kept when it kills a group

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _rank_main(fn, rank: int, world: int, rdzv: str | None, threads: int, args: tuple, results, backend: str) -> None:
    # Threads first: the first torch op fixes the intra-op pool size.
    torch.set_num_threads(threads)
    try:
        if rdzv is not None:
            import torch.distributed as dist

            if "nccl" in backend:  # one GPU per rank, chosen before NCCL binds a communicator to it
                torch.cuda.set_device(rank)
            dist.init_process_group(backend, init_method=f"file://{rdzv}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        results.put((rank, True, out))
    except BaseException as e:  # every failure must reach the parent, or it waits forever
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_group(
    fn: Callable[..., Any],
    world: int,
    args: tuple = (),
    threads: int = 1,
    distributed: bool = True,
    rss_cap_kib: int | None = None,
    timeout_s: float | None = None,
    backend: str = "gloo",
) -> GroupOutcome:
    """Call ``fn(rank, world, *args)`` in ``world`` fresh 'spawn' processes with ``threads`` torch
    threads each, joined by a ``backend`` group (``file://`` rendezvous) when ``distributed``; with
    NCCL, rank r uses GPU r.

    The group is killed as soon as one process's resident set passes ``rss_cap_kib`` or the whole
    run passes ``timeout_s``. ``fn`` and ``args`` must be picklable (module-level functions)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        rdzv = os.path.join(tmp, "rdzv") if distributed else None
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world, rdzv, threads, args, results, backend))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world, rss_cap_kib, timeout_s)
        finally:
            _stop(procs)


def _collect(procs, results, world: int, rss_cap_kib: int | None, timeout_s: float | None) -> GroupOutcome:
    start, got, max_seen = time.monotonic(), {}, 0
    while len(got) < world:
        try:
            rank, ok, payload = results.get(timeout=POLL_S)
            if not ok:
                return GroupOutcome("error", detail=f"rank {rank}: {payload}")
            got[rank] = payload
            continue
        except queue_mod.Empty:
            pass
        for r, p in enumerate(procs):
            rss = current_rss_kib(p.pid) or 0
            max_seen = max(max_seen, rss)
            if rss_cap_kib is not None and rss > rss_cap_kib:
                return GroupOutcome(
                    "over cap", detail=f"rank {r} reached {gib(rss):.2f} GiB", max_seen_rss_kib=max_seen
                )
            if r not in got and p.exitcode not in (None, 0):
                # Died without reporting (killed by the OOM killer, or a crash in native code).
                return GroupOutcome("error", detail=f"rank {r} died with exit code {p.exitcode}")
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return GroupOutcome("timeout", detail=f"no result after {timeout_s:.0f} s")
    return GroupOutcome("ok", results=[got[r] for r in range(world)], max_seen_rss_kib=max_seen)


def _stop(procs) -> None:
    """Join the group's processes; kill (by pid, only ours) those that do not finish promptly."""
    for p in procs:
        p.join(timeout=10)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


# ---------------------------------------------------------------------------------------- inputs

_CHUNK = 4096  # tokens per independently seeded block of a virtual full tensor


def virtual_randn(batch: int, heads: int, head_dim: int, positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows ``positions`` (dim 1) of a standard-normal ``[batch, N, heads, head_dim]`` tensor that is
    defined block by block (block ``c`` of ``_CHUNK`` tokens drawn from seed ``seed + c``), so a
    rank builds its shard without ever holding the full tensor: its peak RSS then measures the
    attention, not the input construction. Rows for ``arange(N)`` give the full tensor itself."""
    positions = positions.to(torch.int64)
    out = torch.empty(batch, positions.numel(), heads, head_dim)
    block_of = positions // _CHUNK
    for c in torch.unique(block_of).tolist():
        where = (block_of == c).nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(seed + c)
        block = torch.randn(batch, _CHUNK, heads, head_dim, generator=gen)
        out[:, where] = block[:, positions[where] - c * _CHUNK]
    return out


def tensor_seed(seed: int, which: int) -> int:
    """Distinct, non-overlapping block seeds for the q, k, v and gradient tensors of one run."""
    return seed * 1_000_003 * 8 + which * 1_000_003


# ---------------------------------------------------------------------------------------- output


def count_sent_bytes(force_ring: bool = False) -> list[int]:
    """Patch this (fresh) process's halo exchange and ring so that every byte it sends is added to
    the returned one-element counter; ``force_ring`` turns the halo off so spans go round the ring."""
    import lsts.parallel.halo as halo
    import lsts.parallel.ring as ring
    from lsts.parallel import RingComm

    sent = [0]
    real_exchange, real_send = halo._exchange, RingComm.send_recv

    def exchange(group, outgoing, incoming):
        sent[0] += sum(t.numel() * t.element_size() for _, t in outgoing)
        real_exchange(group, outgoing, incoming)

    def send_recv(self, tensor):
        sent[0] += tensor.numel() * tensor.element_size()
        return real_send(self, tensor)

    halo._exchange, RingComm.send_recv = exchange, send_recv  # a fresh process: nothing to restore
    if force_ring:
        ring.halo_applies = lambda *args: False
    return sent


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(items):
        return "| " + " | ".join(s.rjust(w) if num else s.ljust(w) for s, w, num in zip(items, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def _is_number(s: str) -> bool:
    if s == "-":  # a missing value does not make a numeric column textual
        return True
    try:
        float(s)
    except ValueError:
        return False
    return True
