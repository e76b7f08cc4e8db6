"""Collectives of a training step (`lsts.parallel.agreement`): after the first step, attention issues
no collective but its data exchange (ring P2P, halo P2P, all-to-all): its inputs agree once per step,
in one collective the trainer issues, not in every layer's call. The first row of each shape still
agrees call by call. Mismatches stay errors on every rank, never a hang: between ranks' rows, between a
call's documents and the row's, and between a later row's calls and the first row's.

Every collective entry point of ``torch.distributed`` (and the functional all-to-all) is wrapped to
log the step it ran in and whether attention code issued it (an lsts attention module on the stack)."""

from __future__ import annotations

import contextlib
import os
import re
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from lsts.config import load_config
from lsts.kernels.attention.documents import document_fields
from lsts.parallel import ring_attention
from lsts.parallel.agreement import RowInputs, StepAgreement
from tests.distributed import errors_on_all_ranks, run_ranks
from tests.test_train import TINY

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "send",
    "recv",
)  # fmt: skip (isend / irecv stay as they are: P2POp accepts only them, and batch_isend_irecv issues them)
DATA_EXCHANGE = {"batch_isend_irecv", "send", "recv", "all_to_all", "all_to_all_single", "all_to_all_single_autograd"}
_ATTENTION_FILES = {
    os.path.join("lsts", "attention.py"),
    *(os.path.join("lsts", "parallel", f"{m}.py") for m in ("checks", "ring", "halo", "ulysses", "hybrid", "rsa")),
}


_AGREEMENT_FILE = os.path.join("lsts", "parallel", "agreement.py")


def _origin(stack) -> str:
    """ "attention" when attention code issued a collective, "step agreement" for the trainer's, else "other"."""
    if any(f.filename.endswith(name) for f in stack for name in _ATTENTION_FILES):
        return "attention"
    return "step agreement" if any(f.filename.endswith(_AGREEMENT_FILE) for f in stack) else "other"


@contextlib.contextmanager
def collective_log(log: list, step: list[int]):
    """Log ``(step[0], collective, its origin)`` for every collective called within."""

    def wrap(name, fn):
        def logged(*args, **kwargs):
            log.append((step[0], name, _origin(traceback.extract_stack())))
            return fn(*args, **kwargs)

        return logged

    with contextlib.ExitStack() as stack:
        for module in (dist, dist.distributed_c10d):
            for name in COLLECTIVES:
                if hasattr(module, name):
                    stack.enter_context(mock.patch.object(module, name, wrap(name, getattr(module, name))))
        fn = funcol.all_to_all_single_autograd
        stack.enter_context(mock.patch.object(funcol, "all_to_all_single_autograd", wrap(fn.__name__, fn)))
        yield


def _train_and_log(rank, world, out, extra):
    from lsts.train import trainer

    log, step = [], [0]
    original = trainer._step

    def counted_step(*args, **kwargs):
        step[0] += 1
        return original(*args, **kwargs)

    cfg = load_config([*TINY, "--seq-len=128", "--steps=3", "--data.batch_size=2", f"--out={out}", *extra])
    with collective_log(log, step), mock.patch.object(trainer, "_step", counted_step):
        trainer.train(cfg)
    return log


@pytest.mark.parametrize(
    ("world", "layout_args"),
    [
        # one full layer (ring P2P) and one window layer (halo P2P), packed documents
        pytest.param(2, ["--parallel.cp_ring=2"], id="ring"),
        pytest.param(2, ["--parallel.cp_ulysses=2"], id="ulysses"),
        pytest.param(2, ["--parallel.cp_ring=2", "--parallel.activation_checkpoint=full"], id="ring-recompute"),
        # Ulysses pairs inside a ring of 2: the first row agrees over each of the two groups
        pytest.param(4, ["--parallel.cp_ring=2", "--parallel.cp_ulysses=2"], id="hybrid", marks=pytest.mark.slow),
    ],
)
def test_attention_issues_only_its_data_exchange_after_the_first_step(tmp_path, world, layout_args):
    for log in run_ranks(_train_and_log, world, str(tmp_path / "run"), layout_args):
        _check_step_log(log)


def _check_step_log(log: list) -> None:
    by_step = {s: [(name, origin) for st, name, origin in log if st == s] for s in (1, 2, 3)}
    # The first rows agree call by call: the log sees attention's agreement collectives...
    assert ("all_gather_single", "attention") in by_step[1]
    for s in (2, 3):
        from_attention = [name for name, origin in by_step[s] if origin == "attention"]
        assert from_attention, "attention exchanged no data: the log missed it"
        assert set(from_attention) <= DATA_EXCHANGE, from_attention  # ...later ones none
        # the one agreement of the step is the trainer's, for every row of it
        assert [origin for _, origin in by_step[s] if origin == "step agreement"] == ["step agreement"]


def _qkv(seed: int, n_local: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n_local, 2, 4, generator=g) for _ in range(3)]


DOCS_A, DOCS_B = [0, 5, 16], [0, 3, 9, 16]


def _row(cu) -> RowInputs:
    from lsts.kernels.attention import Documents

    return RowInputs((1, 8), tuple(document_fields(Documents.from_cu_seqlens(cu)).items()))


def _two_steps_then(rank, world, last):
    """Step 1 (documents A) agrees call by call; step 2 (documents B, same shape) must not; then ``last``."""
    agreement, log, step = StepAgreement(dist.group.WORLD), [], [0]
    q, k, v = _qkv(rank)
    outs = []
    with collective_log(log, step):
        for step[0], cu in ((1, DOCS_A), (2, DOCS_B)):
            agreement.agree([_row(cu)])
            with agreement.row(_row(cu)):
                for _ in range(2):  # two layers
                    outs.append(ring_attention(q, k, v, cu_seqlens=cu, layout="contiguous"))
    expected = [ring_attention(q, k, v, cu_seqlens=cu, layout="contiguous") for cu in (DOCS_A, DOCS_A, DOCS_B, DOCS_B)]
    assert all(torch.equal(a, b) for a, b in zip(outs, expected))  # the scope changes no result
    gathers = [(s, origin) for s, name, origin in log if name == "all_gather_single"]
    assert gathers == [(1, "step agreement"), (1, "attention"), (1, "attention"), (2, "step agreement")]
    if last is not None:
        last(rank, agreement, q, k, v)


def test_rows_of_known_shape_agree_once_per_step():
    run_ranks(_two_steps_then, 2, None)


def _rows_differ_between_ranks(rank, agreement, q, k, v):
    agreement.agree([_row(DOCS_A if rank == 0 else DOCS_B)])


def _call_sees_other_documents(rank, agreement, q, k, v):
    agreement.agree([_row(DOCS_B)])
    with agreement.row(_row(DOCS_B)):
        ring_attention(q, k, v, cu_seqlens=DOCS_A, layout="contiguous")


def _call_differs_from_the_first_row(rank, agreement, q, k, v):
    agreement.agree([_row(DOCS_A)])
    with agreement.row(_row(DOCS_A)):
        ring_attention(q.double(), k.double(), v.double(), cu_seqlens=DOCS_A, layout="contiguous")


def _more_calls_than_the_first_row(rank, agreement, q, k, v):
    agreement.agree([_row(DOCS_A)])
    with agreement.row(_row(DOCS_A)):
        for _ in range(3):
            ring_attention(q, k, v, cu_seqlens=DOCS_A, layout="contiguous")


@pytest.mark.parametrize(
    ("last", "match"),
    [
        (_rows_differ_between_ranks, "packed documents .digest. must be the same on every rank"),
        (_call_sees_other_documents, "differs from the step's agreed value"),
        (_call_differs_from_the_first_row, "but the first row of that shape had"),
        (_more_calls_than_the_first_row, "had no such call"),
    ],
)
def test_mismatches_raise_on_every_rank(last, match):
    messages = errors_on_all_ranks(_two_steps_then, 2, last)
    assert len(messages) == 2 and all(re.search(match, m) for m in messages), messages
