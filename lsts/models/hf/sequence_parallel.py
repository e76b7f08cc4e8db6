"""Sequence parallelism for Hugging Face training: ``transformers.Trainer`` and TRL's ``SFTTrainer``.

    sp = sequence_parallel(model, cp=2, mode="ring")        # "ulysses", or "hybrid" with ulysses=U
    trainer = sp.wrap(SFTTrainer(model=model, args=SFTConfig(packing=True, ...), train_dataset=ds))
    trainer.train()                                          # under torchrun or accelerate launch

What it settles, and how:

- **Mesh.** ``world = dp × cp``; the ``cp`` ranks of one group share each sequence (ring, Ulysses, or
  both: ``cp = ring × ulysses``), the ``dp`` groups see different data. DDP (the Trainer's) still
  averages gradients over every rank.
- **Data.** The Trainer's sampler gives every rank a different batch, as without parallelism. The
  loader adapter (`SequenceParallelLoader`, as DeepSpeed's ``UlyssesSPDataLoaderAdapter``) gathers
  the batches of its cp group and hands out each of them in turn, sharded: every rank of the group
  holds its zigzag shard of the same batch, nothing is dropped, and the loader is ``cp`` times
  longer. A run with ``cp`` = 2 and gradient accumulation G therefore takes the same samples per
  optimizer step, in the same order, as one process with accumulation G.
- **One packed row per batch.** Each batch becomes one row: its rows, and inside them the packed
  documents (restarting ``position_ids`` as transformers detects them, or ``cu_seq_lens_q`` as
  ``DataCollatorWithFlattening`` / TRL's padding-free packing give), each a document of its own;
  padding (a 0/1 ``attention_mask`` with the real tokens in one run per row, left or right) is
  dropped. The row is padded once at its end to a multiple of ``2·cp`` (zigzag), the padding a
  document of its own, out of the loss. Its global ``cu_seqlens`` travel with the batch and reach
  every attention module's context (`SequenceParallel.set_documents`) just before the forward: the
  shards' ``position_ids`` are the row's own positions (for RoPE), never used to infer documents.
  ``attention_mask``, ``cu_seq_lens_*``, ``max_length_*`` and ``seq_idx`` do not go to the model.
- **Labels and loss.** Labels are shifted on the whole row before sharding (``-100`` at every
  document end: a token never predicts the next document) and passed as ``shift_labels`` (also as
  ``labels``, so the model computes its loss), which transformers' causal-LM loss and TRL's fused head
  take without shifting again. The Trainer counts ``num_items_in_batch`` from ``shift_labels`` over
  all ranks and accumulation steps, the model divides its shard's summed loss by it, and the Trainer
  multiplies by the number of processes because DDP averages: the gradient is exactly that of the
  token mean over the global batch, and the logged loss (the mean over ranks) is the true loss.
  `SequenceParallel.wrap` therefore refuses settings that break this chain (label smoothing, which
  shifts again; ``average_tokens_across_devices=False``; a model without loss kwargs).
- **Agreement before collectives.** Each rank first checks and packs its own batch (no collective),
  then one small all-gather of a header (status, length) tells every rank about every other: a
  rank's bad batch, or a rank that ran out of batches early, is the same `ValueError` on every rank of
  the group, never a hang in the data all-gather or in attention.
- **Ecosystem.** One call (`sequence_parallel`) and one wrap of an unchanged ``Trainer`` /
  ``SFTTrainer``; `SequenceParallel.adapt` serves a custom loop with any DataLoader. Evaluation under
  sequence parallelism is refused (evaluate with ``cp=1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lsts.attention import AttentionContext
from lsts.kernels.attention import Span
from lsts.kernels.loss import IGNORE_INDEX
from lsts.models.hf.attention import attention_modules, use_lsts_attention
from lsts.parallel import init_process_group, shard_sequence
from lsts.parallel.dims import ParallelDims
from lsts.parallel.sharding import seq_len_divisor

DOCUMENTS = "lsts_documents"  # batch key: global cu_seqlens of the sharded row, consumed before the forward
# Batch keys the model must not get under sequence parallelism: the documents replace them.
DROPPED = ("attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
KNOWN = ("input_ids", "labels", "shift_labels", "position_ids", *DROPPED)
MODES = ("ring", "ulysses", "hybrid")


@dataclass
class Pack:
    """A batch as one packed row: ``tokens``, ``positions`` and next-token ``labels`` ``[T]`` (int64)
    and the documents' ``cu`` ``[n_docs + 1]``."""

    tokens: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    cu: torch.Tensor

    def padded(self, divisor: int) -> Pack:
        """The row padded at its end to a multiple of ``divisor`` (at least one multiple): the padding
        is a document of its own with positions from 0, outside the loss."""
        n = self.tokens.numel()
        extra = -n % divisor or (divisor if n == 0 else 0)
        if not extra:
            return self
        pad = torch.arange(extra)
        return Pack(
            torch.cat([self.tokens, torch.zeros(extra, dtype=torch.int64)]),
            torch.cat([self.positions, pad]),
            torch.cat([self.labels, torch.full((extra,), IGNORE_INDEX)]),
            torch.cat([self.cu, torch.tensor([n + extra])]),
        )


def _as_rows(batch: dict, key: str, shape: torch.Size) -> torch.Tensor:
    x = batch[key]
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"batch[{key!r}] must be a [batch, seq] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] != shape[1] or x.shape[0] not in (1, shape[0]):
        raise ValueError(f"batch[{key!r}] has shape {tuple(x.shape)}; input_ids has {tuple(shape)}")
    return x.expand(shape).cpu().long()


def _real_run(mask_row: torch.Tensor, row: int) -> tuple[int, int]:
    """``[lo, hi)`` of the real tokens of a padding-mask row; ValueError for anything else."""
    if bool(((mask_row != 0) & (mask_row != 1)).any()):
        raise ValueError(f"attention_mask must hold 0 (padding) and 1 (tokens); row {row} has other values")
    real = mask_row.nonzero().flatten()
    if real.numel() == 0:
        return 0, 0
    lo, hi = int(real[0]), int(real[-1]) + 1
    if hi - lo != real.numel():
        raise ValueError(
            f"attention_mask row {row} is not a padding mask (its tokens are not one run, padding left or right); "
            f"sequence parallelism turns padding into documents and cannot express a mask with holes: pack "
            f"documents (position_ids or DataCollatorWithFlattening) instead"
        )
    return lo, hi


def _document_starts(batch: dict, positions: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Starts (relative to ``lo``) of the documents in the real tokens ``[lo, hi)`` of one row whose
    position ids are ``positions`` ``[S]``."""
    if "cu_seq_lens_q" in batch:
        cu_q = torch.as_tensor(batch["cu_seq_lens_q"]).cpu().long()
        cu_k = torch.as_tensor(batch.get("cu_seq_lens_k", cu_q)).cpu().long()
        if not torch.equal(cu_q, cu_k):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: sequence parallelism trains self-attention only")
        if batch["input_ids"].shape[0] != 1 or int(cu_q[-1]) != positions.numel() or hi - lo != positions.numel():
            raise ValueError(
                f"cu_seq_lens_q (ending at {int(cu_q[-1])}) must cover one unpadded row; the batch has shape "
                f"{tuple(batch['input_ids'].shape)}"
            )
        return cu_q[:-1]
    # transformers' own rule for packed rows: a document starts where the position does not step by 1.
    restarts = (torch.diff(positions[lo:hi]) != 1).nonzero().flatten() + 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), restarts])


def pack_batch(batch: dict) -> Pack:
    """One rank's collated batch as one `Pack` (see the module docstring). No collective; a
    ValueError for a batch that cannot be sharded."""
    unknown = sorted(set(batch) - set(KNOWN))
    if unknown:
        raise ValueError(
            f"sequence parallelism shards {KNOWN[:4]} and drops {DROPPED}; the batch also has {unknown}, which it "
            f"cannot shard: remove them from the collator's output"
        )
    if "input_ids" not in batch or ("labels" not in batch and "shift_labels" not in batch):
        raise ValueError(f"sequence parallelism needs input_ids and labels in every batch; got {sorted(batch)}")
    tokens = batch["input_ids"]
    if not torch.is_tensor(tokens) or tokens.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {getattr(tokens, 'shape', type(tokens))}")
    shape = tokens.shape
    tokens = tokens.cpu().long()
    if "shift_labels" in batch:
        labels = _as_rows(batch, "shift_labels", shape)
    else:
        labels = _as_rows(batch, "labels", shape)
        labels = torch.cat([labels[:, 1:], torch.full((shape[0], 1), IGNORE_INDEX)], dim=1)  # shifted on the row
    if "position_ids" in batch:
        positions = _as_rows(batch, "position_ids", shape)
    else:  # what transformers gives an unpacked row, padded or not
        positions = torch.arange(shape[1]).expand(shape)
    mask = _as_rows(batch, "attention_mask", shape) if "attention_mask" in batch else None
    rows, starts, offset = [], [], 0
    for b in range(shape[0]):
        lo, hi = _real_run(mask[b], b) if mask is not None else (0, shape[1])
        if hi == lo:
            continue
        doc_starts = _document_starts(batch, positions[b], lo, hi)
        row_labels = labels[b, lo:hi].clone()
        row_labels[doc_starts[1:] - 1] = IGNORE_INDEX  # a document's last token has no next token in it
        row_labels[-1] = IGNORE_INDEX
        rows.append((tokens[b, lo:hi], positions[b, lo:hi], row_labels))
        starts.append(doc_starts + offset)
        offset += hi - lo
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64)
        return Pack(empty, empty, empty, torch.zeros(1, dtype=torch.int64))
    tok, pos, lab = (torch.cat(parts) for parts in zip(*rows))
    return Pack(tok, pos, lab, torch.cat([*starts, torch.tensor([offset])]))


class SequenceParallelLoader:
    """Wraps a DataLoader: gathers each batch of the cp group's ranks and yields them one after
    another as this rank's shards (``input_ids``, ``position_ids``, ``labels`` = ``shift_labels``,
    and the row's documents under `DOCUMENTS`). Anything else (``dataset``, ``batch_sampler``, ...)
    is the wrapped loader's."""

    def __init__(self, loader, sp: SequenceParallel, skip: int = 0) -> None:
        self.loader, self.sp, self.skip = loader, sp, skip

    def __len__(self) -> int:
        return len(self.loader) * self.sp.cp - self.skip

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def skip_first(self, n: int) -> SequenceParallelLoader:
        """The loader without its first ``n`` micro-batches (the Trainer's resume)."""
        from accelerate import skip_first_batches

        whole, rest = divmod(n, self.sp.cp)
        return SequenceParallelLoader(skip_first_batches(self.loader, whole), self.sp, skip=rest)

    def __iter__(self):
        skip = self.skip
        for packs in self._gathered():
            for pack in packs[skip:]:
                yield self.sp.shard(pack)
            skip = 0

    def _gathered(self):
        it = iter(self.loader)
        while True:
            try:
                pack, error = pack_batch(next(it)), None
            except StopIteration:
                pack, error = None, None
            except Exception as e:  # any failure here is reported to the whole group: raising alone would hang it
                pack, error = None, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            packs = self.sp.gather_packs(pack, error)
            if packs is None:
                return
            yield packs


class SequenceParallel:
    """The sequence-parallel setup of one model: its mesh, groups and attention context (see
    `sequence_parallel`)."""

    def __init__(self, model: nn.Module, dims: ParallelDims, ctx: AttentionContext, cp_group) -> None:
        self.model, self.dims, self.ctx, self.group = model, dims, ctx, cp_group
        self.cp = dims.cp
        self.modules = attention_modules(model)

    def set_documents(self, cu_seqlens) -> None:
        """Give every attention module the context of this batch's global documents (set before the
        forward, kept until the next batch: a checkpointed layer recomputes in the backward)."""
        ctx = self.ctx.with_documents(cu_seqlens)
        for module in self.modules:
            module.lsts_ctx = ctx

    def shard(self, pack: Pack) -> dict:
        """This rank's shard of one (gathered) `Pack`, as model inputs."""
        pack = pack.padded(seq_len_divisor(self.ctx.layout, self.cp))
        tokens, positions, labels = (
            shard_sequence(x[None], self.group, layout=self.ctx.layout)
            for x in (pack.tokens, pack.positions, pack.labels)
        )
        inputs = {"input_ids": tokens, "position_ids": positions, "labels": labels, "shift_labels": labels}
        return {**inputs, DOCUMENTS: pack.cu}

    def gather_packs(self, pack: Pack | None, error: str | None) -> list[Pack] | None:
        """Every rank's `Pack` of this step, in group rank order; None when every rank is out of data.
        A rank's error, or ranks out of data at different times, is the same ValueError on all."""
        status = 2 if error is not None else (1 if pack is None else 0)
        n, n_cu = (0, 0) if pack is None else (pack.tokens.numel(), pack.cu.numel())
        header = self._all_gather(torch.tensor([status, n, n_cu]))
        statuses = header[:, 0].tolist()
        if 2 in statuses:
            messages = [None] * self.cp
            dist.all_gather_object(messages, error, group=self.group)
            bad = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
            raise ValueError("sequence parallelism cannot shard this step's batches; " + "; ".join(bad))
        if all(s == 1 for s in statuses):
            return None
        if 1 in statuses:
            raise ValueError(
                f"the ranks of a sequence-parallel group ran out of batches at different steps (out: "
                f"{[r for r, s in enumerate(statuses) if s == 1]}); give every rank the same number of batches"
            )
        width, cu_width = int(header[:, 1].max()), int(header[:, 2].max())
        rows = torch.zeros(3, width, dtype=torch.int64)
        rows[:, :n] = torch.stack([pack.tokens, pack.positions, pack.labels])
        cu = torch.zeros(cu_width, dtype=torch.int64)
        cu[:n_cu] = pack.cu
        all_rows, all_cu = self._all_gather(rows), self._all_gather(cu)
        return [Pack(*all_rows[r, :, :m], all_cu[r, :c]) for r, (_, m, c) in enumerate(header.tolist())]

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        nccl = dist.get_backend(self.group) == "nccl"
        comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        parts = [torch.empty_like(x, device=comm_device) for _ in range(self.cp)]
        dist.all_gather(parts, x.to(comm_device), group=self.group)
        return torch.stack(parts).cpu()

    def adapt(self, loader) -> SequenceParallelLoader:
        """``loader`` (each rank's own batches) as sharded micro-batches of the cp group."""
        return SequenceParallelLoader(loader, self)

    def wrap(self, trainer):
        """Make a ``transformers.Trainer`` (or TRL trainer) built on this model train with sequence
        parallelism: its train loader is adapted, each batch's documents reach the attention before
        the loss, the reported batch size is per dp group. Returns the trainer. ValueError (the same
        on every rank) for settings that would make the loss wrong."""
        if self.cp == 1:
            return trainer
        check_trainer(trainer)
        get_train_dataloader, compute_loss = trainer.get_train_dataloader, trainer.compute_loss
        total_batch = trainer.get_total_train_batch_size

        def compute_loss_on_documents(model, inputs, *args, **kwargs):
            if DOCUMENTS not in inputs:
                raise ValueError("under sequence parallelism every batch must come from the adapted train loader")
            self.set_documents(inputs.pop(DOCUMENTS))
            return compute_loss(model, inputs, *args, **kwargs)

        def refuse_evaluation(*args, **kwargs):
            raise ValueError("evaluation under sequence parallelism is not supported; evaluate the model with cp=1")

        trainer.get_train_dataloader = lambda: self.adapt(get_train_dataloader())
        trainer.get_resumed_dataloader = lambda loader, n: loader.skip_first(n)
        trainer.compute_loss = compute_loss_on_documents
        trainer.get_total_train_batch_size = lambda args: total_batch(args) // self.cp
        trainer.get_eval_dataloader = refuse_evaluation
        return trainer


def check_trainer(trainer) -> None:
    """The Trainer settings under which the sharded loss is the token mean of the global batch."""
    args = trainer.args
    if not args.average_tokens_across_devices:
        raise ValueError(
            "sequence parallelism needs average_tokens_across_devices=True (the default): each rank's loss is its "
            "shard's share of the token mean over all ranks"
        )
    if args.label_smoothing_factor:
        raise ValueError(
            "sequence parallelism passes pre-shifted labels, which label smoothing shifts again; "
            "set label_smoothing_factor=0"
        )
    if not (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None):
        raise ValueError(
            f"{type(trainer.model).__name__}.forward takes no loss kwargs (num_items_in_batch, shift_labels), so its "
            f"loss cannot be the token mean over the sequence-parallel group; pass a compute_loss_func that takes "
            f"pre-shifted labels"
        )
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None and (pc.cp_enabled or pc.sp_enabled):
        raise ValueError("lsts sequence parallelism replaces accelerate's cp_size/sp_size: leave them at 1")


def _init_distributed() -> int:
    """The world size, initializing torch.distributed from torchrun's environment if needed."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():  # NCCL collectives run on this rank's own device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_process_group()
    return dist.get_world_size() if dist.is_initialized() else 1


def sequence_parallel(
    model: nn.Module,
    cp: int,
    mode: str = "ring",
    ulysses: int | None = None,
    layout: str = "zigzag",
    backend: str = "auto",
    span: Span | list[Span | None] | None = None,
) -> SequenceParallel:
    """Run ``model``'s attention on lsts, each sequence sharded over ``cp`` ranks by ``mode``
    (``"ring"``, ``"ulysses"``, or ``"hybrid"``: ``ulysses`` ranks per Ulysses group × ``cp/ulysses``
    ring ranks); the world is ``dp × cp``. Call on every rank after torch.distributed is up (or under
    torchrun / accelerate launch, which this initializes), then `SequenceParallel.wrap` a Trainer.
    ValueError, the same on every rank, for degrees that do not fit the world or the model."""
    if mode not in MODES:
        raise ValueError(f"unknown sequence-parallel mode {mode!r}; choose one of {MODES}")
    if mode == "hybrid" and (ulysses is None or not 1 < ulysses < cp or cp % ulysses):
        raise ValueError(
            f"hybrid needs a Ulysses degree strictly between 1 and cp ({cp}) that divides it; got ulysses={ulysses}"
        )
    if mode != "hybrid" and ulysses is not None:
        raise ValueError(f"ulysses={ulysses} is the Ulysses degree of mode='hybrid'; mode {mode!r} takes none")
    world = _init_distributed()
    if cp < 1 or world % cp:
        raise ValueError(
            f"cp={cp} must divide the {world} processes (world = dp x cp); launch with "
            f"torchrun --nproc-per-node {max(cp, 1)} (or accelerate launch --num-processes {max(cp, 1)})"
        )
    uly = {"ring": 1, "ulysses": cp, "hybrid": ulysses}[mode]
    dims = ParallelDims(dp_replicate=world // cp, cp_ring=cp // uly, cp_ulysses=uly)
    cfg = model.config.get_text_config()
    dims.check_model(cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    if layout not in ("zigzag", "contiguous"):
        raise ValueError(f"packed documents need layout 'zigzag' or 'contiguous', not {layout!r}")
    if cp == 1:
        ctx, group = AttentionContext("local", backend, layout), None
    else:
        mesh = dims.build_mesh("cuda" if dist.get_backend() == "nccl" else "cpu")
        ctx, group = AttentionContext.from_mesh(dims, mesh, backend, layout), mesh["cp"].get_group()
    use_lsts_attention(model, span, ctx)
    return SequenceParallel(model, dims, ctx, group)


__all__ = ["DOCUMENTS", "Pack", "SequenceParallel", "SequenceParallelLoader", "pack_batch", "sequence_parallel"]
