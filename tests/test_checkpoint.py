"""Checkpoints: exact round trip of model, optimizer, scheduler, data position and RNG; atomicity
(interrupted saves are invisible and refused); retention; resharding from 2 FSDP2 ranks to one plain
process and from 1 process to 2 ranks; clear errors for damaged files."""

import io
import json
import random
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lsts.train.checkpoint import (
    MARKER,
    Checkpointer,
    _derived_seed,
    complete_checkpoints,
    latest_checkpoint,
    read_info,
)
from tests.distributed import run_ranks


class ToyLoader:
    """A data loader reduced to what a checkpoint sees: a global position."""

    def __init__(self):
        self.position, self.epoch = 0, 0

    def state_dict(self):
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.position, self.epoch = state["position"], state["epoch"]


def _parts(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler, ToyLoader()


def _train(model, optimizer, scheduler, loader, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 8, generator=g)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        loader.position += 4


def _draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
        else:
            assert a[key] == b[key], key


def _full_state(model, optimizer):
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optimizer, options=full)


def test_round_trip_restores_everything_exactly(tmp_path):
    parts = _parts()
    _train(*parts, steps=3)
    Checkpointer(tmp_path, every=3, keep=0, parallel_dims={"dp": 1}).maybe_save(3, *parts, extra={"tokens": 96})
    want_draws = _draws()
    want = [p.state_dict() for p in parts]

    model, optimizer, scheduler, loader = _parts(seed=7)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    step = Checkpointer(tmp_path, every=3, keep=0).load_latest(model, optimizer, scheduler, loader)

    assert step == 3
    assert _draws() == want_draws
    for got, expected in zip((model, optimizer, scheduler, loader), want):
        _assert_same_tensors(got.state_dict(), expected)
    info = read_info(latest_checkpoint(tmp_path))
    assert (info.step, info.world_size, info.parallel_dims, info.extra) == (3, 1, {"dp": 1}, {"tokens": 96})


def test_resumed_training_matches_uninterrupted_training(tmp_path):
    first = _parts()
    _train(*first, steps=2)
    Checkpointer(tmp_path, every=2, keep=1).maybe_save(2, *first)
    resumed = _parts(seed=5)
    Checkpointer(tmp_path, every=2, keep=1).load_latest(*resumed)
    _train(*resumed, steps=2, seed=2)
    _train(*first, steps=2, seed=2)  # the run that was never interrupted, continued the same way

    _assert_same_tensors(resumed[0].state_dict(), first[0].state_dict())
    _assert_same_tensors(resumed[1].state_dict(), first[1].state_dict())


def test_interrupted_saves_are_invisible_and_refused(tmp_path):
    parts = _parts()
    ckpt = Checkpointer(tmp_path, every=1, keep=0)
    done = ckpt.maybe_save(1, *parts)
    root = tmp_path / "checkpoints"
    (root / "step-000002.tmp").mkdir()  # a save cut short before the rename
    unmarked = root / "step-000003"
    unmarked.mkdir()  # a directory that never got its marker
    (unmarked / ".metadata").write_bytes(b"")

    assert latest_checkpoint(tmp_path) == done
    assert ckpt.load_latest(*_parts(seed=3)) == 1
    for path in (root / "step-000002.tmp", unmarked):
        with pytest.raises(ValueError, match=rf"{path.name} is incomplete .*step-000001"):
            ckpt.load(path, *_parts())


def test_retention_keeps_the_newest_k(tmp_path):
    parts = _parts()
    ckpt = Checkpointer(tmp_path, every=2, keep=2)
    saved = [step for step in range(1, 8) if ckpt.maybe_save(step, *parts, force=step == 7)]
    assert saved == [2, 4, 6, 7]
    assert ckpt.maybe_save(7, *parts, force=True) is None  # a second final save is a no-op
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000006", "step-000007"]


def test_rerun_from_an_earlier_step_discards_the_abandoned_future(tmp_path):
    parts = _parts()
    ckpt = Checkpointer(tmp_path, every=1, keep=0)
    for step in (1, 2, 3):
        ckpt.maybe_save(step, *parts)
    Checkpointer(tmp_path, every=1, keep=0).maybe_save(2, *parts)  # a new run, restarted at step 2
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


def _shard_file(path):
    return sorted(path.glob("*.distcp"))[0]


def test_truncated_or_missing_shard_is_a_clear_error(tmp_path):
    parts = _parts()
    ckpt = Checkpointer(tmp_path, every=1, keep=0)
    ckpt.maybe_save(1, *parts)
    path = ckpt.maybe_save(2, *parts)
    shard = _shard_file(path)
    data = shard.read_bytes()

    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt: {shard.name} has .*bytes.*step-000001"):
        ckpt.load_latest(*_parts())
    # Damage the size check cannot see (marker rewritten to match): DCP's own failure, explained.
    info = json.loads((path / MARKER).read_text())
    info["files"][shard.name] = shard.stat().st_size
    (path / MARKER).write_text(json.dumps(info))
    with pytest.raises(ValueError, match=rf"cannot load checkpoint {re.escape(str(path))}(.|\n)*delete"):
        ckpt.load_latest(*_parts())
    shard.unlink()
    with pytest.raises(ValueError, match=f"{shard.name} is missing"):
        ckpt.load_latest(*_parts())


def test_loading_a_part_that_was_not_saved_is_refused(tmp_path):
    model, optimizer, scheduler, _ = _parts()
    path = Checkpointer(tmp_path, every=1, keep=0).maybe_save(1, model, optimizer)
    with pytest.raises(ValueError, match="no 'scheduler' state"):
        Checkpointer(tmp_path, every=1, keep=0).load(path, model, optimizer, scheduler)


class PickyLoader(ToyLoader):
    def load_state_dict(self, state):
        raise ValueError("data checkpoint was written for seed=0, this run has 1")


def test_a_part_refusing_its_state_speaks_for_itself(tmp_path):
    model, optimizer, scheduler, loader = _parts()
    path = Checkpointer(tmp_path, every=1, keep=0).maybe_save(1, model, optimizer, scheduler, loader)
    with pytest.raises(ValueError, match=r"^data checkpoint was written for seed=0"):
        Checkpointer(tmp_path, every=1, keep=0).load(path, model, optimizer, scheduler, PickyLoader())


# ---- resharding across world sizes --------------------------------------------------------------


def _portable(obj) -> bytes:
    """Tensors as bytes: a tensor put on the result queue is shared by file descriptor, which dies
    with the rank that sent it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _save_fsdp2(rank, world, out):
    """Two ranks, FSDP2 over a 1-D mesh: one step on rank-dependent data, then save; return the
    gathered full state for the single-process comparison."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    model, _, _, loader = _parts()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    _train(model, optimizer, scheduler, loader, steps=2, seed=10 + rank)
    ckpt = Checkpointer(out, every=2, keep=1, parallel_dims={"dp_shard": world})
    ckpt.maybe_save(2, model, optimizer, scheduler, loader)
    full = _full_state(model, optimizer)  # a collective: every rank calls it
    return _portable(full) if rank == 0 else None


def test_fsdp2_checkpoint_from_two_ranks_loads_into_one_plain_process(tmp_path):
    want_model, want_optim = _unpack(run_ranks(_save_fsdp2, 2, str(tmp_path))[0])
    model, optimizer, scheduler, loader = _parts(seed=3)
    assert Checkpointer(tmp_path, every=2, keep=1).load_latest(model, optimizer, scheduler, loader) == 2
    got_model, got_optim = _full_state(model, optimizer)
    _assert_same_tensors(got_model, want_model)
    _assert_same_tensors(got_optim, want_optim)
    assert scheduler.last_epoch == 2 and loader.position == 8
    assert read_info(latest_checkpoint(tmp_path)).world_size == 2


def _load_on_ranks(rank, world, out):
    model, optimizer, scheduler, loader = _parts(seed=9)
    step = Checkpointer(out, every=1, keep=0, seed=42).load_latest(model, optimizer, scheduler, loader)
    return _portable((step, model.state_dict(), torch.rand(4)))


def test_single_process_checkpoint_loads_on_two_ranks_and_reseeds_the_new_one(tmp_path):
    parts = _parts()
    _train(*parts, steps=1)
    Checkpointer(tmp_path, every=1, keep=0).maybe_save(1, *parts)
    want_rank0 = torch.rand(4)  # rank 0 continues the saved stream
    want_rank1 = torch.rand(4, generator=torch.Generator().manual_seed(_derived_seed(42, 1, 1)))

    results = [_unpack(r) for r in run_ranks(_load_on_ranks, 2, str(tmp_path))]
    for step, state, _ in results:
        assert step == 1
        _assert_same_tensors(state, parts[0].state_dict())
    torch.testing.assert_close(results[0][2], want_rank0, rtol=0, atol=0)
    torch.testing.assert_close(results[1][2], want_rank1, rtol=0, atol=0)


def _save_with_rank_dependent_loader(rank, world, out):
    model, optimizer, scheduler, loader = _parts()
    loader.position = rank
    try:
        Checkpointer(out, every=1, keep=0).maybe_save(1, model, optimizer, scheduler, loader)
    except ValueError as e:
        return str(e)
    return None


def test_a_data_loader_state_that_differs_across_ranks_is_refused(tmp_path):
    for message in run_ranks(_save_with_rank_dependent_loader, 2, str(tmp_path)):
        assert message is not None and "differs across ranks" in message
    assert latest_checkpoint(tmp_path) is None
