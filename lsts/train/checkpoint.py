"""Atomic, reshardable training checkpoints on `torch.distributed.checkpoint` (DCP).

A checkpoint holds the model and optimizer (through DCP's ``get_/set_model_state_dict`` and
``get_/set_optimizer_state_dict``, which understand FSDP2, DDP and plain modules), the LR scheduler,
the data loader (any object with ``state_dict`` / ``load_state_dict``) and each rank's RNG state
(torch CPU, CUDA when present, Python ``random``, NumPy). Every rank writes its own shards; DCP
records the global shape of every tensor, so a checkpoint saved on one layout (cp=2, dp=4) loads on
another (cp=1, dp=2, or one plain process): that is the resharding.

Layout under the run's output directory::

    <out>/checkpoints/step-000050/         complete: DCP files + COMPLETE.json
    <out>/checkpoints/step-000075.tmp/     a save in progress (or one a crash interrupted)

A save writes into ``step-N.tmp``; once every rank is done, rank 0 writes ``COMPLETE.json`` (step,
world size, parallel dims, time, caller's extras, the size of every file) and renames the directory
to ``step-N`` with one ``os.replace``, which is atomic on a POSIX filesystem. Only directories named
``step-N`` that hold the marker count as checkpoints, so a crash at any moment leaves the previous
checkpoint as the latest and loses at most the steps since it. Retention deletes older checkpoints
only after the new one is complete.

One out directory holds one timeline: saving step N discards complete checkpoints *after* N (left
by an abandoned run), because ``--resume`` would otherwise pick them over the state just written.

Limits: ``out`` must be one filesystem that every rank sees (DCP writes each rank's shards there).
The data loader's state is stored once, not per rank, so it must describe a global position (as a
global sample index does); a save checks that all ranks agree. RNG states are per rank; a resume on
a different world size re-seeds the ranks that have no saved state, and says so.

``frozen=False`` leaves out parameters that do not train (a LoRA run's base weights, which the run
reloads from its source checkpoint): a resume loads what was saved and keeps the frozen rest as
built. The marker records it, and a load with the other setting is refused.

Engines whose state DCP cannot see (DeepSpeed ZeRO's partitioned optimizer state and parameters)
plug in an `EngineState`: it writes the model, optimizer and scheduler into the same ``step-N.tmp``
directory with its own format, under the same marker, rename and retention; the marker names it, and
a load refuses a checkpoint written by another kind of engine state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger(__name__)

SUBDIR = "checkpoints"
MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-\d+\.(tmp|stale)$")


@dataclass
class CheckpointInfo:
    """What ``COMPLETE.json`` records about one complete checkpoint."""

    step: int
    world_size: int
    parallel_dims: dict = field(default_factory=dict)
    time: float = 0.0
    extra: dict = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # relative path -> size in bytes
    engine_state: str = ""  # the `EngineState.name` that wrote the model and optimizer; "" = DCP
    frozen: bool = True  # whether the parameters that do not train were saved too


class EngineState(Protocol):
    """Model, optimizer and scheduler state that an engine saves and loads itself, instead of DCP.

    Both calls are collective over every rank. ``save`` writes into ``directory`` (the checkpoint
    being written; DCP's files sit beside it); ``load`` reads it back and raises ValueError for a
    checkpoint it cannot take (``info`` says on how many ranks, in which layout, it was saved).
    """

    name: str

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path, info: CheckpointInfo) -> None: ...


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(out_dir) / SUBDIR


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def complete_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of the run in ``out_dir``, oldest first; ``.tmp`` and unmarked dirs excluded."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / MARKER).is_file()]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of the run in ``out_dir``, or None."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def checkpoint_contents(out_dir: str | os.PathLike) -> list[str]:
    """What the run's checkpoint directory holds, one phrase per entry, for a message such as
    ``step-000002 (incomplete: no COMPLETE.json)``."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if _STEP_DIR.match(path.name) and path.is_dir():
            found.append(path.name if (path / MARKER).is_file() else f"{path.name} (incomplete: no {MARKER})")
        elif _LEFTOVER.match(path.name):
            found.append(f"{path.name} (an interrupted save)")
        else:
            found.append(f"{path.name} (not a checkpoint)")
    return found


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    """The marker of checkpoint ``path``; ValueError if the directory is not a complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.name.endswith(".tmp") or not (path / MARKER).is_file():
        raise ValueError(
            f"checkpoint {path} is incomplete (no {MARKER}: its save was interrupted). "
            f"Resume from a complete one{_alternatives(path)}, or delete it"
        )
    try:
        return CheckpointInfo(**json.loads((path / MARKER).read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt: unreadable {MARKER} ({e}). {_advice(path)}") from e


class Checkpointer:
    """Save every ``every`` steps (0 = only when forced) into ``<out_dir>/checkpoints``, keep the
    newest ``keep`` (0 = all), and load the latest. Works without ``torch.distributed`` (one process)
    and on any process group; every rank of ``process_group`` must make the same calls.

    ``seed`` re-seeds ranks that find no saved RNG state on a resharded resume; ``parallel_dims``
    (a JSON-able dict such as ``{"dp": 2, "cp": 2}``) is recorded in each marker for the reader.
    With ``engine_state``, it saves and loads the model, optimizer and scheduler: pass None for those.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        every: int,
        keep: int,
        process_group: dist.ProcessGroup | None = None,
        *,
        seed: int = 0,
        parallel_dims: dict | None = None,
        engine_state: EngineState | None = None,
        frozen: bool = True,
    ) -> None:
        if every < 0 or keep < 0:
            raise ValueError(f"checkpoint every ({every}) and keep ({keep}) must be >= 0; 0 = at the end / keep all")
        self.out_dir = Path(out_dir)
        self.dir = checkpoint_dir(out_dir)
        self.every, self.keep, self.group = every, keep, process_group
        self.seed = seed
        self.parallel_dims = dict(parallel_dims or {})
        self.engine_state = engine_state
        self.frozen = frozen
        self._last_saved: int | None = None

    def maybe_save(
        self,
        step: int,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        data_loader: Any = None,
        extra: dict | None = None,
        *,
        force: bool = False,
    ) -> Path | None:
        """Save when ``step`` is a multiple of ``every`` or ``force`` (the last step); else None.

        Saving the same step twice is a no-op, so a forced final save may coincide with a periodic one.
        """
        due = force or (self.every > 0 and step % self.every == 0)
        if not due or step == self._last_saved:
            return None
        return self.save(step, model, optimizer, scheduler, data_loader, extra)

    def save(
        self,
        step: int,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        data_loader: Any = None,
        extra: dict | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically (see the module docstring); return its directory."""
        t0 = time.perf_counter()
        final = self.dir / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        info = CheckpointInfo(step, _world_size(), self.parallel_dims, time.time(), dict(extra or {}))
        info.engine_state = self.engine_state.name if self.engine_state else ""
        info.frozen = self.frozen
        json.dumps(info.__dict__)  # a non-JSON extra fails here, before any rank writes a byte
        state = self._state_dicts(model, optimizer, scheduler, data_loader)
        if data_loader is not None:
            _check_same_on_all_ranks(state["dataloader"], "data loader state", self.group)

        _on_rank0(lambda: _fresh_dir(tmp), self.group)
        state["rng"] = {f"rank{_global_rank()}": _rng_state()}
        with _single_process_is_intended():
            dcp.save(state, checkpoint_id=tmp, process_group=self.group, no_dist=not _distributed())
        if self.engine_state is not None:
            self.engine_state.save(tmp)
        # dcp.save ends collectively already; the barrier states the ordering without relying on that.
        _barrier(self.group)
        _on_rank0(lambda: self._commit(tmp, final, info), self.group)
        self._last_saved = step
        if _group_rank(self.group) == 0:
            log.info("checkpoint step %d saved to %s in %.1f s", step, final, time.perf_counter() - t0)
        return final

    def load_latest(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        data_loader: Any = None,
    ) -> int | None:
        """Load the newest complete checkpoint into the given objects; its step, or None if there is none."""
        path = latest_checkpoint(self.out_dir)
        if path is None:
            if _group_rank(self.group) == 0:
                log.info("no complete checkpoint in %s: starting from step 0", self.dir)
            return None
        return self.load(path, model, optimizer, scheduler, data_loader)

    def load(
        self,
        path: str | os.PathLike,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        data_loader: Any = None,
    ) -> int:
        """Load checkpoint ``path`` (resharding as needed) and return its step.

        ValueError, naming the directory, if it is incomplete, corrupt, or lacks a part asked for.
        Pass None for a part to leave it alone (an evaluation needs only the model).
        """
        path = Path(path)
        info = read_info(path)
        _check_files(path, info)
        self._check_engine_state(path, info)
        keys = _saved_keys(path)
        state = self._state_dicts(model, optimizer, scheduler, data_loader)
        for section in state:
            if not any(k == section or k.startswith(section + ".") for k in keys):
                raise ValueError(f"checkpoint {path} holds no {section!r} state (saved without it); pass None for it")
        if self.engine_state is not None:  # first: it refuses what it cannot take before anything is read
            self.engine_state.load(path, info)
        rank = _global_rank()
        own_rng = f"rng.rank{rank}."
        rng_parts = {k[len(own_rng) :] for k in keys if k.startswith(own_rng)}
        if rng_parts:
            state["rng"] = {f"rank{rank}": _rng_destination(rng_parts)}
        try:
            with _single_process_is_intended():
                dcp.load(state, checkpoint_id=path, process_group=self.group, no_dist=not _distributed())
        except (Exception, dcp.CheckpointException) as e:  # DCP's exception derives from BaseException
            raise ValueError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}\n{_advice(path)}") from e
        _apply_state(state, model, optimizer, scheduler, data_loader, self.frozen)
        self._restore_rng(state, rank, info)
        self._last_saved = info.step
        if _group_rank(self.group) == 0:
            _log_resume(path, info)
        return info.step

    def _state_dicts(self, model, optimizer, scheduler, data_loader) -> dict[str, Any]:
        if self.engine_state is not None and not (model is optimizer is scheduler is None):
            name = self.engine_state.name
            raise ValueError(f"the engine state {name!r} holds the model, optimizer and scheduler; pass None for them")
        return _state_dicts(model, optimizer, scheduler, data_loader, self.frozen)

    def _check_engine_state(self, path: Path, info: CheckpointInfo) -> None:
        if self.frozen and not info.frozen:
            raise ValueError(
                f"checkpoint {path} holds only the trained parameters (its frozen weights come from the source "
                "checkpoint of a fine-tuning run); load it with that run's command, or a Checkpointer(frozen=False) "
                "over a model built from the same source"
            )
        ours = self.engine_state.name if self.engine_state else ""
        if info.engine_state != ours:
            raise ValueError(
                f"checkpoint {path} holds the model and optimizer as {_engine_kind(info.engine_state)}, but this "
                f"run keeps them as {_engine_kind(ours)}; resume it with the data-parallel engine that saved it"
            )

    def _restore_rng(self, state: dict, rank: int, info: CheckpointInfo) -> None:
        if "rng" in state:
            _set_rng_state(state["rng"][f"rank{rank}"])
            return
        # A new rank of a resharded run has no stream to continue: start a fresh, reproducible one.
        seed_of = (self.seed, info.step, rank)
        _seed_everything(_derived_seed(*seed_of))
        saved_on = f"checkpoint step {info.step} (saved on {info.world_size} ranks)"
        log.info("rank %d: %s has no RNG state for it; seeded from (seed, step, rank)=%s", rank, saved_on, seed_of)

    def _commit(self, tmp: Path, final: Path, info: CheckpointInfo) -> None:
        """Rank 0, after every rank wrote: mark, rename into place, then prune (see module docstring)."""
        info.files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_json_durably(tmp / MARKER, info.__dict__)
        stale = final.with_name(final.name + ".stale")
        if final.exists():  # the same step from an earlier attempt: move it aside, never merge
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        shutil.rmtree(stale, ignore_errors=True)
        self._prune(info.step)

    def _prune(self, step: int) -> None:
        done = complete_checkpoints(self.out_dir)
        newer = [p for p in done if _step_of(p) > step]
        older = [p for p in done if _step_of(p) < step]
        doomed = newer + (older[: max(0, len(older) - (self.keep - 1))] if self.keep > 0 else [])
        if newer:
            log.warning("step %d written: removing checkpoints of an abandoned timeline: %s", step, newer)
        doomed += [p for p in self.dir.iterdir() if _LEFTOVER.match(p.name)]  # interrupted earlier saves
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)


def _engine_kind(name: str) -> str:
    return f"{name!r} engine state" if name else "torch.distributed.checkpoint state dicts"


def _check_parts(scheduler, data_loader) -> None:
    for name, obj in (("scheduler", scheduler), ("data loader", data_loader)):
        if obj is not None and not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            kind = type(obj).__name__
            raise ValueError(f"the {name} ({kind}) needs state_dict() and load_state_dict() to be checkpointed")


def _state_dicts(model, optimizer, scheduler, data_loader, frozen: bool = True) -> dict[str, Any]:
    """What DCP writes, and on load the destination it reads into (tensors in place, objects replaced).

    The model and optimizer go through DCP's state-dict API: parameter FQNs as keys whatever the
    wrapper (FSDP2, DDP, none) and sharded tensors as DTensors, which is what lets a load reshard.
    """
    _check_parts(scheduler, data_loader)
    state: dict[str, Any] = {}
    if model is not None:
        state["model"] = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=not frozen))
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if data_loader is not None:
        state["dataloader"] = data_loader.state_dict()
    return state


def _apply_state(state, model, optimizer, scheduler, data_loader, frozen: bool = True) -> None:
    """Hand what was read to its owners. Outside DCP on purpose: their own errors (a data stream of
    another config, a model of another shape) reach the caller unwrapped."""
    if model is not None:
        # Without the frozen weights the saved dict is partial by design; every trainable one is in it.
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=frozen))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if data_loader is not None:
        data_loader.load_state_dict(state["dataloader"])


# ---- RNG ----------------------------------------------------------------------------------------


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _rng_state() -> dict[str, Any]:
    # Tuples are stored by DCP as one opaque object each, which is what these states are.
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = tuple(torch.cuda.get_rng_state_all())
    if (np := _numpy()) is not None:
        state["numpy"] = np.random.get_state()
    return state


def _rng_destination(parts: Iterable[str]) -> dict[str, Any]:
    """Placeholders for the RNG parts this rank saved: a tensor to load into, None for objects."""
    return {part: torch.get_rng_state() if part == "torch" else None for part in parts}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # A machine with fewer devices restores what it has; extra devices keep their seeds.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    if "numpy" in state and (np := _numpy()) is not None:
        np.random.set_state(state["numpy"])


def _derived_seed(seed: int, step: int, rank: int) -> int:
    # A hash, not arithmetic, so that (seed, step, rank) triples never collide by accident.
    return int.from_bytes(hashlib.sha256(f"lsts:{seed}:{step}:{rank}".encode()).digest()[:4], "little")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    if (np := _numpy()) is not None:
        np.random.seed(seed)


# ---- validation ---------------------------------------------------------------------------------


def _alternatives(path: Path) -> str:
    """' (step-000025, step-000050)' naming the complete checkpoints beside ``path``, or ''."""
    done = [p.name for p in complete_checkpoints(path.parent.parent) if p != path]
    return f" ({', '.join(done)})" if done else ""


def _advice(path: Path) -> str:
    earlier = _alternatives(path)
    return f"If its files are damaged, delete {path} (or move it aside) and resume from an earlier step{earlier}."


def _check_files(path: Path, info: CheckpointInfo) -> None:
    """Every file the marker lists is there with its size: catches a deleted or truncated shard early."""
    for name, size in info.files.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is corrupt: {name} is missing. {_advice(path)}")
        if file.stat().st_size != size:
            raise ValueError(
                f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, {size} were written. "
                f"{_advice(path)}"
            )


def _saved_keys(path: Path) -> set[str]:
    try:
        return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt: unreadable DCP metadata ({e}). {_advice(path)}") from e


def _check_same_on_all_ranks(value: Any, what: str, group) -> None:
    if _world_size(group) == 1:
        return
    digest = hashlib.sha256(pickle.dumps(value)).hexdigest()
    digests: list[str | None] = [None] * _world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) > 1:
        raise ValueError(
            f"the {what} differs across ranks, but a checkpoint stores it once so that it can reshard; "
            "make its state_dict() describe the global position (e.g. a global sample index)"
        )


def _log_resume(path: Path, info: CheckpointInfo) -> None:
    now = _world_size()
    if info.world_size != now:
        log.info(
            "resharding checkpoint %s: saved on %d ranks %s, loaded on %d",
            path,
            info.world_size,
            info.parallel_dims,
            now,
        )
    log.info("checkpoint step %d loaded from %s", info.step, path)


# ---- files and collectives ----------------------------------------------------------------------


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # leftovers of a crashed attempt at the same step
    path.mkdir(parents=True)


def _write_json_durably(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` survive a power loss, not only a process crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _global_rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _group_rank(group) -> int:
    return dist.get_rank(group) if _distributed() else 0


def _world_size(group=None) -> int:
    return dist.get_world_size(group) if _distributed() else 1


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns on every save and load without a process group; for us that is a supported mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(group) -> None:
    if _distributed():
        dist.barrier(group=group)


def _on_rank0(fn: Callable[[], None], group) -> None:
    """Run ``fn`` on rank 0 of ``group``; then every rank raises if it failed, so that none hangs in
    a later collective or carries on alone. Doubles as a barrier."""
    error, message = None, None
    if _group_rank(group) == 0:
        try:
            fn()
        except Exception as e:
            error, message = e, f"{type(e).__name__}: {e}"
    if _distributed():
        box = [message]
        dist.broadcast_object_list(box, group=group, group_src=0)
        message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"checkpoint: rank 0 failed: {message}")


__all__ = [
    "MARKER",
    "CheckpointInfo",
    "Checkpointer",
    "EngineState",
    "checkpoint_contents",
    "checkpoint_dir",
    "complete_checkpoints",
    "latest_checkpoint",
    "read_info",
    "step_dir_name",
]
