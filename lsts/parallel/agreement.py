"""Cross-rank agreement of attention inputs: once per training step, not once per attention call.

Sequence-parallel attention exchanges data between the ranks of a group (ring P2P, all-to-all,
halo). Ranks that disagree about shapes, dtype, span or packed documents would hang in that
exchange or mix wrong data, so every call first checks that its inputs agree (`attention_setup`).
Outside a training step the check is `agree_across_ranks`: one small all-gather read on the host,
per call. On a GPU that is a stream drain in every layer, forward and recompute, which this module
removes from the training step.

**Protocol.** A rank may skip a collective only when every rank of the group skips it, so whether a
call skips must follow from values the ranks have already agreed on. A rank's own cache of inputs
it has seen is not such a value: if one rank's inputs changed and another's did not, the first would
miss its cache and enter a collective the second never joins, a hang. Instead:

1. Once per step the trainer agrees, in one collective over the context-parallel group, on every row
   it will run: the row's token shape and the fields of its packed documents (`StepAgreement.agree`,
   a `ValueError` on every rank when they differ).
2. Each row's forward and backward run inside ``StepAgreement.row(row)``. There an attention call
   compares its document fields with the row's agreed ones, locally. Its other fields (shapes,
   heads, dtype, span, layout, group size) follow from the row's agreed shape and from the model.
   The first row of a given shape in a run, which every rank knows to be the first since they agree
   on the shapes of every step, runs the full per-call agreement (one collective per call, as
   outside a step) and records the calls in order; each later row of that shape compares its calls
   with the recorded ones position by position, locally: no collective.
3. Outside a row scope every call agrees with a collective, as before.

A local comparison can fail on one rank alone only when ranks given the same agreed inputs build
different attention calls (rank-dependent model code): then that rank raises the error and its peers
get the process group's timeout error in their next collective. Every other mismatch (bad data, a
shape or documents differing between ranks, a model whose calls changed between steps on all ranks)
is the same `ValueError` on every rank, before any data moves.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

from lsts.parallel.comm import agree_across_ranks

_ACTIVE: _RowScope | None = None  # module-wide, not per thread: the autograd engine recomputes in its own threads


@dataclass(frozen=True)
class RowInputs:
    """What one row of a step gives every attention call of it: the token shape (this rank's shard)
    and ``data``, values the calls' own fields must equal (the packed documents' fields)."""

    shape: tuple[int, ...]
    data: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> tuple:
        """What the attention calls' other fields follow from: the shape and which data fields exist."""
        return self.shape, tuple(name for name, _ in self.data)


def _digest(values) -> int:
    """A 62-bit digest of ``repr(values)`` that fits an int64 and is the same in every process."""
    return int.from_bytes(hashlib.sha256(repr(values).encode()).digest()[:8], "little") >> 2


class StepAgreement:
    """Per-step agreement over ``group`` (the context-parallel group; None or one rank: nothing to
    agree). One per training run: it records the attention calls of the first row of each shape."""

    def __init__(self, group) -> None:
        self.group = group
        self._agreed: list[RowInputs] = []
        self._calls: dict[tuple, list[tuple]] = {}  # row key -> that row's attention calls, in order

    def agree(self, rows: list[RowInputs]) -> None:
        """One collective: every rank runs the same rows this step (a `ValueError` on all ranks if not)."""
        fields = {
            "micro-batch rows": len(rows),
            "tokens": sum(math.prod(r.shape) for r in rows),
            "row shapes (digest)": _digest([r.shape for r in rows]),
            "packed documents (digest)": _digest([r.data for r in rows]),
        }
        agree_across_ranks(self.group, fields, None)
        self._agreed = list(rows)

    @contextlib.contextmanager
    def row(self, row: RowInputs) -> Iterator[None]:
        """Attention calls within check against ``row`` (agreed by `agree` this step)."""
        global _ACTIVE
        if row not in self._agreed:
            raise ValueError(f"row {row} was not agreed this step; call StepAgreement.agree with every row first")
        if _ACTIVE is not None:
            raise RuntimeError("StepAgreement.row scopes do not nest")
        recorded = self._calls.get(row.key)
        scope = _RowScope(row, recorded)
        _ACTIVE = scope
        try:
            yield
        finally:
            _ACTIVE = None
        # Reached only when the row ran to the end on this rank (an error on every rank leaves
        # nothing recorded, alike everywhere); later rows of this shape compare against it.
        if recorded is None:
            self._calls[row.key] = scope.calls


class _RowScope:
    def __init__(self, row: RowInputs, recorded: list[tuple] | None) -> None:
        self.row = row
        self.recorded = recorded  # None: the first row of its shape, which agrees call by call
        self.calls: list[tuple] = []

    def check(self, group, fields: dict[str, int], local_error: str | None, decode: dict | None) -> None:
        data = dict(self.row.data)
        for name, value in fields.items():
            if name in data and value != data[name] and local_error is None:
                local_error = (
                    f"{name} of this attention call ({value}) differs from the step's agreed value ({data[name]}): "
                    "attention inside a training step must see the row's own documents"
                )
        call = (group, tuple((n, v) for n, v in fields.items() if n not in data))
        if self.recorded is None:
            agree_across_ranks(group, fields, local_error, decode)
            self.calls.append(call)
            return
        if local_error is not None:
            raise ValueError(local_error)
        i = len(self.calls)
        self.calls.append(call)
        expected = self.recorded[i] if i < len(self.recorded) else None
        if expected is None or expected[0] is not call[0] or expected[1] != call[1]:
            raise ValueError(
                f"attention call {i} of a row of shape {self.row.shape} has inputs {dict(call[1])}, but the first "
                f"row of that shape had {dict(expected[1]) if expected else 'no such call'}; the attention calls "
                "of a step must follow from its agreed rows (use StepAgreement only around such code)"
            )


def check_call(group, fields: dict[str, int], local_error: str | None, decode: dict | None = None) -> None:
    """Agreement of one attention call: inside a `StepAgreement.row` scope as that scope says,
    otherwise `agree_across_ranks` (one collective)."""
    if _ACTIVE is None:
        agree_across_ranks(group, fields, local_error, decode)
    else:
        _ACTIVE.check(group, fields, local_error, decode)


__all__ = ["RowInputs", "StepAgreement", "check_call"]
