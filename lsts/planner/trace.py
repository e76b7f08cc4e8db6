"""One rank's training step, traced on fake tensors: the memory the real code allocates, without
allocating it.

`trace_step` builds the trainer's `MASFormer` under `torch._subclasses.FakeTensorMode` for one
rank's shard (``seq_len / cp`` tokens, ``heads / tp``, the layers of a pipeline stage), applies the
same memory passes as the trainer (`lsts.models.masformer_parallelize.parallelize`: feed-forward tiling,
activation checkpointing, offload) and runs two training steps (forward, chunked loss, backward,
AdamW; the second one with the optimizer state resident) under torch's
`torch.distributed._tools.mem_tracker.MemTracker`, which counts every live tensor storage by kind
(parameters, gradients, optimizer state, activations, temporaries) and per module.

Context parallelism is traced for real: a ``fake`` process group stands for the world and the real
ring / Ulysses / hybrid attention runs on this rank's shard. Only the transport is replaced
(`_sequence_parallel_transport`): a ring transfer returns a fresh buffer shaped like the one sent
(the receive buffer the real `RingComm` allocates) and a halo exchange leaves the caller's receive
buffers as they are; both count the bytes they send, as does the Ulysses all-to-all (its backward
too). Values read back to Python (``.item()``) are answered by `_PlausibleReads` (no bad label, step
1), since fake tensors hold none.

Not traced: tensor parallelism's collectives (the linears are traced at their ``1 / tp`` width),
the data-parallel engine (FSDP2 / DDP: `lsts.planner.predict` adds their shards and buffers by
formula) and the pipeline's sends.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY as _TOTAL
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _ModState
from torch.utils._python_dispatch import TorchDispatchMode

from lsts.attention import AttentionContext
from lsts.config import Config
from lsts.kernels.loss import linear_cross_entropy
from lsts.models.masformer import MASFormer
from lsts.models.masformer_parallelize import parallelize
from lsts.parallel.dims import ParallelDims
from lsts.parallel.pipeline import split_stage

ONE_RANK = ParallelDims(1, 1, 1, 1, 1, 1)
_BLOCK_FQN = re.compile(r"\.layers\.(\d+)$")  # a transformer block, as ModTracker names it


@dataclass
class StepTrace:
    """What one traced rank held at its peak, in bytes, and what it sent."""

    params: int
    grads: int
    optimizer: int
    activations: int  # saved for backward, including recomputed ones
    temporaries: int  # gradients of activations and other backward scratch
    loss_chunk: int  # what the chunked loss adds at the peak (0 when the peak is outside it)
    layers: dict[str, int] = field(default_factory=dict)  # activations each block leaves for backward
    sent: dict[str, int] = field(default_factory=dict)  # sequence-parallel bytes sent, by transport
    receive_buffers: int = 0  # most bytes of ring / all-to-all receive buffers alive at once (inside the above)
    block_params: int = 0  # elements of the largest transformer block (for FSDP's buffers)
    root_params: int = 0  # elements outside the blocks (embedding, final norm, output)
    local_params: int = 0  # elements of this rank's model (tp-sliced, pipeline stage)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.temporaries + self.loss_chunk


class _PlausibleReads(TorchDispatchMode):
    """Answer reads of a fake tensor's value as a run without faults would: a check passes
    (``bad.any()`` is False, ``torch.equal`` True) and a count is 1 (the optimizer's step)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.equal.default:
            return True
        if func is torch.ops.aten._local_scalar_dense.default:
            x = args[0]
            return False if x.dtype == torch.bool else (1.0 if x.is_floating_point() else 1)
        return func(*args, **(kwargs or {}))


class _Loss(nn.Module):
    """The trainer's loss (`lsts.train.trainer.lm_loss` after the model) as a module, so that the
    tracker reports the chunked loss's own peak."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.kernels = cfg.kernels

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        k = self.kernels
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight = weight.to(hidden.dtype)
        return linear_cross_entropy(
            hidden, weight, labels, reduction="sum", chunk_size=k.loss_chunk_size, backend=k.loss
        )[0]


class _LiveBytes:
    """Bytes of the followed tensors alive now, and the most at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def follow(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.untyped_storage().nbytes()
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._release, nbytes)
        return t

    def _release(self, nbytes: int) -> None:
        self.now -= nbytes


@contextlib.contextmanager
def _sequence_parallel_transport(sent: dict[str, int], received: _LiveBytes):
    """Replace the ring's P2P, the halo exchange and the Ulysses all-to-all by local stand-ins that
    allocate what the real ones allocate and add the bytes they would send to ``sent``; the ring's
    and the all-to-all's receive buffers are followed by ``received``."""
    import lsts.parallel.agreement as agreement
    import lsts.parallel.halo as halo
    import lsts.parallel.ulysses as ulysses
    from lsts.parallel.comm import RingComm

    def send_recv(comm, tensor):
        sent["ring"] += tensor.numel() * tensor.element_size()
        comm.messages_sent += 1
        return received.follow(torch.empty_like(tensor.contiguous()))

    def exchange(group, outgoing, incoming):
        sent["halo"] += sum(t.numel() * t.element_size() for _, t in outgoing)

    def all_to_all(x, scatter_dim, gather_dim, group=None):
        world = dist.get_world_size(group)
        nbytes = x.numel() * x.element_size() * (world - 1) // world  # our own slab stays
        sent["ulysses"] += nbytes
        out = received.follow(real_all_to_all(x, scatter_dim, gather_dim, group))
        if out.requires_grad:  # the backward sends the gradient the same way back

            def count_backward(grad):
                sent["ulysses"] += nbytes

            out.register_hook(count_backward)
        return out

    saved = (RingComm.send_recv, RingComm.wait, halo._exchange, ulysses.all_to_all, agreement.agree_across_ranks)
    real_all_to_all = ulysses.all_to_all
    RingComm.send_recv, RingComm.wait, halo._exchange = send_recv, lambda comm: None, exchange
    ulysses.all_to_all = all_to_all
    agreement.agree_across_ranks = lambda *args, **kwargs: None  # a fake table agrees with anything
    try:
        yield
    finally:
        RingComm.send_recv, RingComm.wait, halo._exchange, ulysses.all_to_all, agreement.agree_across_ranks = saved


@contextlib.contextmanager
def _fake_world(world: int) -> Iterator[None]:
    """A ``fake`` default process group of ``world`` ranks (this process is rank 0) while the trace
    runs, gone again after it (an in-process caller's later code must not see it); a real one is
    never replaced."""
    if dist.is_initialized():
        if dist.get_backend() != "fake":
            raise ValueError("the planner traces with a fake process group: run it in its own process, not in a job")
        dist.destroy_process_group()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _slice_for_tensor_parallel(model: MASFormer, tp: int) -> None:
    """Each block's linears at a tensor-parallel rank's width: q/k/v and w1/w3 keep ``1/tp`` of
    their outputs, wo and w2 of their inputs (the plan of `apply_tensor_parallel`)."""
    for block in model.layers.values():
        a, f = block.attention, block.feed_forward
        for parent, name, dim in ((a, "wq", 0), (a, "wk", 0), (a, "wv", 0), (a, "wo", 1), (f, "w1", 0), (f, "w3", 0),
                                  (f, "w2", 1)):  # fmt: skip
            old = getattr(parent, name)
            out_f, in_f = old.out_features // (tp if dim == 0 else 1), old.in_features // (tp if dim == 1 else 1)
            setattr(parent, name, nn.Linear(in_f, out_f, bias=False, dtype=old.weight.dtype))


@functools.cache
def _first_window(data_fields: tuple, vocab_size: int) -> tuple[int, ...] | None:
    """The document boundaries of the trainer's first window (None: the corpus did not load)."""
    from lsts.config import DataConfig
    from lsts.train.data import build_data

    data = DataConfig(**dict(data_fields))
    try:
        loader = build_data(data, dp_rank=0, dp_world=1, cp_rank=0, cp_world=1, layout="contiguous",
                            vocab_size=vocab_size)  # fmt: skip
        return tuple(int(b) for b in next(iter(loader)).cu_seqlens[0])
    except (ValueError, OSError, StopIteration):
        return None


def documents_for(cfg: Config) -> list[int] | None:
    """Global document boundaries for the traced batch: the trainer's first batch when the corpus
    loads, else one document (a `ValueError` or `OSError` of the data pipeline: it is not ours to
    report here; the trainer will)."""
    if not cfg.data.doc_masking:
        return None
    first = _first_window(tuple(sorted(vars(cfg.data).items())), cfg.model.vocab_size)
    return list(first) if first is not None else [0, cfg.data.seq_len]


def trace_step(
    cfg: Config, dims: ParallelDims, dtype: torch.dtype, stage: int = 0, documents=None, keep_grads: bool = True
) -> StepTrace:
    """Trace two training steps of rank 0 of ``dims`` (pipeline ``stage``) for ``cfg``'s model,
    sequence, memory passes and loss; ``documents``: global boundaries (`documents_for`).

    ``keep_grads=False`` drops each parameter's gradient as soon as it is complete: a data-parallel
    engine reduces it away from the traced module (its shard is the engine's, added by formula),
    and an unsharded gradient piling up through the backward would move the traced peak to where
    it is not. The optimizer state is then not traced either."""
    p, seq = cfg.parallel, cfg.data.seq_len
    # The per-pack layouts hold N/P tokens a rank and send what zigzag sends: traced as zigzag.
    layout = "zigzag" if p.layout in ("balanced", "auto") else p.layout
    local = seq // dims.cp
    sent: dict[str, int] = defaultdict(int)
    with _fake_world(dims.world_size) if dims.cp > 1 else contextlib.nullcontext():
        mesh = dims.build_mesh("cpu") if dims.cp > 1 else None
        ctx = AttentionContext.from_mesh(dims if dims.cp > 1 else ONE_RANK, mesh, cfg.kernels.attention, layout)
        ctx = ctx.with_documents(documents)
        positions = _positions(seq, dims.cp, layout)
        received = _LiveBytes()
        transport = _sequence_parallel_transport(sent, received)
        with FakeTensorMode(allow_non_fake_inputs=True) as fake, _PlausibleReads(), transport:
            model = _build(cfg, dtype)
            if dims.tp > 1:
                _slice_for_tensor_parallel(model, dims.tp)
            if dims.pp > 1:
                model = split_stage(model, dims.pp, stage)
            sizes = _param_sizes(model)
            model = parallelize(model, ONE_RANK, None, "fsdp2", p.activation_checkpoint, dtype,
                                activation_offload=p.activation_offload, mlp_tile_tokens=p.mlp_tile_tokens)  # fmt: skip
            loss_fn = _Loss(cfg)
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
            tracker = MemTracker()
            tracker.track_external(model, optimizer, loss_fn)
            last = model.output_weight if (model.norm is not None) else None
            if not keep_grads:
                for weight in model.parameters():
                    weight.register_post_accumulate_grad_hook(_drop_grad)
            with tracker, warnings.catch_warnings():
                # The tracker's gradient hook runs after ours and finds the dropped gradient gone.
                warnings.filterwarnings("ignore", "Expected a tensor or a traceable wrapper-subclass", UserWarning)
                for _ in range(2):
                    tracker.reset_mod_stats()  # MemTracker keeps one iteration's per-module records
                    sent.clear()
                    if model.tok_embeddings is not None:
                        inputs = fake.from_tensor(torch.zeros(1, local, dtype=torch.long))
                    else:  # a later pipeline stage receives hidden states, and sends their gradient back
                        inputs = torch.zeros(1, local, cfg.model.dim, dtype=dtype, requires_grad=True)
                    hidden = model(inputs, fake.from_tensor(positions), ctx)
                    if last is not None:
                        loss_fn(hidden, last, fake.from_tensor(torch.zeros(local, dtype=torch.long))).backward()
                    else:  # an earlier pipeline stage: the gradient of its output arrives from the next one
                        hidden.backward(torch.zeros_like(hidden))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            return _summarize(tracker, loss_fn, dict(sent), sizes, received.peak)


def _drop_grad(weight: torch.Tensor) -> None:
    weight.grad = None


def _build(cfg: Config, dtype: torch.dtype) -> MASFormer:
    """The model with its parameters in ``dtype`` (created so: a fake module cannot be cast)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return MASFormer(cfg.model, cfg.kernels)
    finally:
        torch.set_default_dtype(default)


def _positions(seq: int, cp: int, layout: str) -> torch.Tensor:
    from lsts.parallel.sharding import layout_indices

    if cp == 1:
        return torch.arange(seq)[None]
    return layout_indices(seq, cp, 0, layout)[None]


def _param_sizes(model: MASFormer) -> dict[str, int]:
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.layers.values()]
    total = sum(p.numel() for p in model.parameters())
    return {"local_params": total, "block_params": max(blocks, default=0), "root_params": total - sum(blocks)}


def _summarize(tracker: MemTracker, loss_fn, sent, sizes, receive_buffers: int) -> StepTrace:
    """The categories at the step's peak; the loss chunk split out of them when the peak falls in
    the loss (the usual case: every activation is still held and the first chunk's logits exist)."""
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    entries, loss_peak, loss_chunk, after_blocks = {}, 0, 0, None
    for module, stats in tracker.memory_tracking.items():
        snaps = stats.snapshots
        if module is loss_fn:
            loss_peak = max(_total(snaps.get(_ModState.PEAK_FW)), _total(snaps.get(_ModState.PEAK_BW)))
            loss_chunk = max(loss_peak - _total(snaps.get(_ModState.PRE_FW)), 0)
        elif block := _BLOCK_FQN.search(stats.mod_fqn):
            entries[int(block.group(1))] = (_total(snaps.get(_ModState.PRE_FW)), _total(snaps.get(_ModState.POST_FW)))
        elif stats.mod_fqn.endswith(".norm"):  # the final norm: entered once the last block's input is let go
            after_blocks = _total(snaps.get(_ModState.PRE_FW))
    layers = _kept_per_block(entries, after_blocks)
    activations, temporaries = peak[_MemRefType.ACT], peak[_MemRefType.TEMP] + peak[_MemRefType.OTH]
    if loss_peak < peak[_TOTAL]:
        loss_chunk = 0  # the peak is elsewhere: the loss adds nothing to it
    from_temporaries = min(loss_chunk, temporaries)
    return StepTrace(
        params=peak[_MemRefType.PARAM] + peak[_MemRefType.BUFFER],
        grads=peak[_MemRefType.GRAD],
        optimizer=peak[_MemRefType.OPT],
        activations=activations - (loss_chunk - from_temporaries),
        temporaries=temporaries - from_temporaries,
        loss_chunk=loss_chunk,
        layers=layers,
        sent=sent,
        receive_buffers=receive_buffers,
        **sizes,
    )


def _kept_per_block(entries: dict[int, tuple[int, int]], after_blocks: int | None) -> dict[str, int]:
    """What each block leaves alive for backward: the growth from its entry to the next block's
    entry (by then its input, unless saved, is gone); the last block's up to the final norm (a
    stage without one: to its own exit, which also counts its output)."""
    order = sorted(entries)
    ends = [entries[i][0] for i in order[1:]] + [after_blocks if after_blocks is not None else entries[order[-1]][1]]
    return {str(i): end - entries[i][0] for i, end in zip(order, ends)} if order else {}


def _total(snapshots) -> int:
    """The total of a module's last snapshot in one state (0 when it has none)."""
    if not snapshots:
        return 0
    return next(iter(snapshots[-1].values()), {}).get(_TOTAL, 0)


__all__ = ["StepTrace", "trace_step"]
