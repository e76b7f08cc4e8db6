"""Run a function on N gloo ranks in separate processes, as torchrun would, and collect results.

Ranks rendezvous through a ``file://`` store in a fresh temporary directory (no port races). Each
rank's return value comes back to the test; a rank that raises makes `run_ranks` raise with that
rank's traceback. Workers come from a forkserver that has imported torch once, so a spawn is cheap.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_lib
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "lsts.parallel"])
TIMEOUT = datetime.timedelta(seconds=120)


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def _worker(fn, rank, world, init_file, args, queue, env):
    torch.set_num_threads(1)
    try:
        if env is not None:  # the rank creates its process group itself, as under torchrun
            os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
            result = fn(rank, world, *args)
        else:
            kw = {"init_method": f"file://{init_file}", "rank": rank, "world_size": world, "timeout": TIMEOUT}
            dist.init_process_group("gloo", **kw)
            try:
                result = fn(rank, world, *args)
            finally:
                dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException as e:
        queue.put((rank, False, (type(e).__name__, str(e), traceback.format_exc())))


def run_ranks(fn, world: int, *args, timeout: float = 300.0, own_group: bool = False) -> list:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo ranks; return the results in rank order.
    ``own_group``: no process group is made for ``fn``; it finds torchrun's variables (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) in the environment instead."""
    env = None
    if own_group:
        env = {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        queue = _CTX.Queue()
        procs = [_CTX.Process(target=_worker, args=(fn, r, world, init_file, args, queue, env)) for r in range(world)]
        for p in procs:
            p.start()
        results, errors = {}, {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world:
                try:
                    rank, ok, payload = queue.get(timeout=1.0)
                except queue_lib.Empty:
                    _check_alive(procs, results, errors, deadline)
                    continue
                (results if ok else errors)[rank] = payload
                if not ok:  # the others may now wait forever in a collective: stop them
                    deadline = min(deadline, time.monotonic() + 10.0)
        finally:
            for p in procs:
                p.join(timeout=5 if errors else 30)
                if p.is_alive():
                    p.kill()
    if errors:
        # A rank's own exception first; ranks that only hung, died or lost a peer because of it last.
        order = sorted(errors, key=lambda r: (_collateral(*errors[r][:2]), r))
        reports = [f"rank {r} of {world} raised {errors[r][0]}: {errors[r][1]}\n{errors[r][2]}" for r in order]
        raise RankError("\n".join(reports))
    return [results[r] for r in range(world)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collateral(name: str, message: str) -> bool:
    return name in ("Timeout", "ProcessDied") or "Connection reset by peer" in message or "Connection closed" in message


def _check_alive(procs, results, errors, deadline) -> None:
    """Turn a rank that died without reporting (or a hang past the deadline) into an error."""
    for rank, p in enumerate(procs):
        if rank not in results and rank not in errors and p.exitcode is not None:
            errors[rank] = ("ProcessDied", f"exit code {p.exitcode}", "(no traceback: the process died)")
    if time.monotonic() > deadline:
        for rank in range(len(procs)):
            if rank not in results and rank not in errors:
                errors[rank] = ("Timeout", "no result before the deadline (hang?)", "")


def errors_on_all_ranks(fn, world: int, *args) -> list[str]:
    """Run ``fn`` on every rank expecting a `ValueError`; return each rank's message (or raise)."""
    return run_ranks(_expect_value_error, world, fn, *args)


def _expect_value_error(rank, world, fn, *args):
    try:
        fn(rank, world, *args)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"rank {rank}: no ValueError was raised")
