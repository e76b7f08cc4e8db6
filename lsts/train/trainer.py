"""The training loop behind ``torchrun launch/train.py``: config -> mesh -> model -> parallelize ->
data -> steps with a token-weighted loss, a non-finite guard, metrics and atomic checkpoints.

Every rank validates the whole configuration against the world before the first collective, so a
bad value is the same clear `ValueError` everywhere, never a hang.

What the loop trains is a `lsts.train.engine.Job` (a `MASFormerJob` by default), and it steps through
the `lsts.train.engine.Update` the job builds (`lsts.train.engine.build_update`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import logging
import math
import os
import time

import torch
import torch.distributed as dist

from lsts.attention import AttentionContext
from lsts.cli import RunError
from lsts.config import Config, KernelsConfig
from lsts.kernels.attention.documents import document_fields
from lsts.kernels.loss import linear_cross_entropy
from lsts.models.masformer import MASFormer
from lsts.models.masformer_parallelize import parallelize
from lsts.parallel.agreement import RowInputs, StepAgreement
from lsts.parallel.comm import init_process_group
from lsts.parallel.data_parallel import gradient_scale
from lsts.parallel.dims import ParallelDims
from lsts.parallel.pipeline import PipelineRunner, check_pipeline, pipeline_loss, split_stage
from lsts.parallel.sharding import LAYOUTS
from lsts.train import zero
from lsts.train.checkpoint import Checkpointer, checkpoint_contents, checkpoint_dir, latest_checkpoint, read_info
from lsts.train.data import IGNORE_INDEX, build_data, row_layouts
from lsts.train.engine import Job, Update, build_update, check_engine, lr_lambda
from lsts.train.metrics import MetricsLogger, device_peak_flops, mfu, peak_memory_gib

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteError(RunError):
    """A step produced a non-finite loss or gradient; the optimizer did not step."""


def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype]:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is visible; use train.device=cpu (or auto)")
    cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dtype = DTYPES.get(cfg.train.dtype) or (torch.bfloat16 if cuda else torch.float32)
    return device, dtype


def init_distributed(cfg: Config, device: torch.device) -> bool:
    """torchrun sets the rendezvous variables; a plain ``python launch/train.py`` runs one rank.
    Returns whether a process group was created here (an existing one, e.g. a test's, is used)."""
    if dist.is_initialized():
        return False
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":  # the step's token counts and loss sums are host scalars: gloo carries those
        backend = "cpu:gloo,cuda:nccl"
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    if "RANK" in os.environ:
        init_process_group(backend, timeout=timeout)
    else:  # one rank meets only itself: an in-memory store, no file or port left behind
        init_process_group(backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)
    return True


def check_run(cfg: Config, dims: ParallelDims, world: int) -> None:
    """Everything about the world, the model and the sequence that can be wrong, before collectives."""
    dims.validate(world)
    check_engine(cfg, dims)
    dims.check_model(cfg.model.n_heads, cfg.model.n_kv_heads)
    for layout in row_layouts(cfg.parallel.layout, auto_layouts(dims), cfg.data.doc_masking):
        dims.check_seq_len(cfg.data.seq_len, layout)
    check_pipeline(dims.pp, cfg.model.n_layers, cfg.model.tie_embeddings)
    if dims.pp > 1 and cfg.parallel.pp_microbatches != cfg.data.batch_size:
        raise ValueError(
            f"parallel.pp_microbatches ({cfg.parallel.pp_microbatches}) must equal data.batch_size "
            f"({cfg.data.batch_size}): each row of a batch is one pipeline micro-batch"
        )


def auto_layouts(dims: ParallelDims) -> tuple[str, ...]:
    """What ``parallel.layout=auto`` chooses from, per row: zigzag, and balanced when the ring alone
    carries context parallelism (a Ulysses rank attends whole sequences, which any layout balances;
    the hybrid's ring takes zigzag or contiguous only)."""
    return ("zigzag", "balanced") if dims.cp_ring > 1 and dims.cp_ulysses == 1 else ("zigzag",)


def train(cfg: Config, job: Job | None = None) -> dict:
    """Run the configured training (``job``, a `MASFormerJob` of ``cfg`` by default); returns the
    last step's metrics."""
    device, dtype = resolve_device(cfg)
    created = init_distributed(cfg, device)
    try:
        return _train(cfg, device, dtype, job or MASFormerJob(cfg))
    finally:
        if created:
            dist.destroy_process_group()


class MASFormerJob:
    """What `train` trains by default (a `lsts.train.engine.Job`): a `MASFormer` from ``cfg.model``,
    parallelized by `lsts.models.masformer_parallelize.parallelize`, with a pipeline schedule when
    pp > 1; `lsts.finetune.trainer.FinetuneJob` is the other job."""

    save_frozen = True  # checkpoints hold every parameter (a fine-tuning job leaves its frozen base out)
    checkpoint_extra: dict = {}  # recorded in every checkpoint's marker  # noqa: RUF012 - read only

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.vocab_size = cfg.model.vocab_size

    def check(self, dims: ParallelDims, world: int) -> None:
        check_run(self.cfg, dims, world)

    def build(self, dims: ParallelDims, mesh, device: torch.device, dtype: torch.dtype) -> tuple[Update, float]:
        """``(update, flops per token)``."""
        cfg = self.cfg
        model = MASFormer(cfg.model, cfg.kernels).to(device)
        model.init_weights(cfg.train.seed)
        flops_per_token = model.flops_per_token(cfg.data.seq_len)
        if dims.pp > 1:
            model = split_stage(model, dims.pp, mesh["pp"].get_local_rank())
        p = cfg.parallel
        model = parallelize(
            model, dims, mesh, p.dp_engine, p.activation_checkpoint, param_dtype=dtype,
            activation_offload=p.activation_offload, mlp_tile_tokens=p.mlp_tile_tokens,
            compile_blocks=cfg.train.compile,
        )  # fmt: skip
        update = build_update(cfg, model, dims, device, dtype, functools.partial(lm_loss, cfg.kernels))
        if dims.pp > 1:
            pp_group = mesh["pp"].get_group()
            loss_fn = pipeline_loss(
                lambda: update.loss_scale,
                reduction="sum",
                chunk_size=cfg.kernels.loss_chunk_size,
                backend=cfg.kernels.loss,
            )
            update.runner = PipelineRunner(
                update.model, mesh["pp"].get_local_rank(), dims.pp, pp_group, device, cfg.data.batch_size, loss_fn
            )
            update.pp_group = pp_group
        return update, flops_per_token

    def check_resume(self, extra: dict) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def finish(self, update) -> None:
        pass


def _train(cfg: Config, device: torch.device, dtype: torch.dtype, job: Job) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims.from_config(cfg.parallel, world)
    job.check(dims, world)
    log.info("output directory %s (config.yaml, metrics.jsonl, checkpoints/)", os.path.abspath(cfg.train.out))
    resume_from = resume_point(cfg)  # before building anything: a wrong --resume fails at once
    if resume_from is not None:
        info = read_info(resume_from)
        job.check_resume(info.extra)
        _warn_if_schedule_changed(cfg, info.step, info.extra.get("schedule"))
    mesh = dims.build_mesh(device.type)
    dp_rank = mesh["dp"].get_local_rank()
    cp_rank = mesh["cp"].get_local_rank()
    if rank == 0:
        os.makedirs(cfg.train.out, exist_ok=True)
        cfg.save(os.path.join(cfg.train.out, "config.yaml"))
    log.info("%d rank(s) on %s, %s: %s", world, device.type, str(dtype).removeprefix("torch."), dims.to_dict())

    torch.manual_seed(cfg.train.seed)
    update, flops_per_token = job.build(dims, mesh, device, dtype)
    ctx = AttentionContext.from_mesh(dims, mesh, cfg.kernels.attention, cfg.parallel.layout)  # each row sets its layout
    data = build_data(
        cfg.data,
        dp_rank=dp_rank,
        dp_world=dims.dp,
        cp_rank=cp_rank,
        cp_world=dims.cp,
        layout=cfg.parallel.layout,
        vocab_size=job.vocab_size,
        auto_layouts=auto_layouts(dims),
    )
    ckpt = Checkpointer(
        cfg.train.out,
        cfg.checkpoint.every,
        cfg.checkpoint.keep,
        seed=cfg.train.seed,
        parallel_dims=dims.to_dict(),
        engine_state=update if isinstance(update, zero.ZeroUpdate) else None,
        frozen=job.save_frozen,
    )
    extra = {**job.checkpoint_extra, "schedule": schedule_of(cfg)}
    start = 0
    if resume_from is not None:
        start = ckpt.load(resume_from, *update.checkpoint_parts, data)
        # The saved learning rate followed the saved run's schedule; continue on this run's (its
        # optim.lr and train.steps), from the saved step.
        scheduler = update.scheduler
        scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.optimizer.param_groups)
        for group in scheduler.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # get_last_lr(): the log
    logger = MetricsLogger(
        cfg.train.out,
        rank,
        cfg.train.steps,
        tensorboard=cfg.metrics.tensorboard,
        jsonl=cfg.metrics.jsonl,
        progress_bar=cfg.metrics.progress_bar,
        start_step=start,
    )
    peak = device_peak_flops(device, dtype)
    dp_cp_group = mesh["dp_cp"].get_group()
    pp_group = mesh["pp"].get_group() if dims.pp > 1 else None
    # Attention inputs agree once per step over the context-parallel group, not in every attention call;
    # the pipeline's schedule interleaves rows, so its attention calls keep agreeing one by one.
    agreement = StepAgreement(mesh["cp"].get_group()) if dims.cp > 1 and dims.pp == 1 else None
    metrics: dict = {}
    batches = iter(data)
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            job.before_step(step)
            loss, n_tokens, imbalance = _step(cfg, update, ctx, batches, dims, dp_cp_group, pp_group, device, agreement)
            if not math.isfinite(loss):  # before the update, which with ZeRO also computes the norm
                raise _non_finite(step, loss, "not computed", cfg.train.out)
            grad_norm, lr, applied = update.step()
            if not applied:
                raise _non_finite(step, loss, grad_norm, cfg.train.out)
            elapsed = time.perf_counter() - t0
            tokens_per_sec = n_tokens / elapsed
            metrics = {
                "loss": loss,
                "tokens_per_sec": tokens_per_sec,
                "mem_gib": peak_memory_gib(device),
                "grad_norm": grad_norm,
                "lr": lr,
                "step_time_s": elapsed,
            }
            metrics["mfu"] = mfu(flops_per_token, tokens_per_sec, world, peak)
            if dims.cp > 1:
                metrics["cp_imbalance"] = imbalance
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                logger.log(step, **metrics)
            ckpt.maybe_save(step, *update.checkpoint_parts, data, extra, force=step == cfg.train.steps)
    finally:
        logger.close()
    job.finish(update)
    return {"step": cfg.train.steps, **metrics}


# The config values that shape the learning rate over the steps; a resume with others bends the curve.
SCHEDULE_KEYS = ("train.steps", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.schedule")


def schedule_of(cfg: Config) -> dict:
    """``{section.field: value}`` of `SCHEDULE_KEYS`, recorded in every checkpoint."""
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in SCHEDULE_KEYS}


def resume_point(cfg: Config) -> os.PathLike | None:
    """The checkpoint this run continues from under ``train.resume`` (None: step 0), with the
    decision logged. ValueError when ``true`` finds no complete checkpoint, naming what is there."""
    out, mode = cfg.train.out, cfg.train.resume
    latest, where = latest_checkpoint(out), checkpoint_dir(out)
    if latest is not None and mode != "false":
        log.info("resuming from %s (train.resume=%s)", latest, mode)
        return latest
    found = ", ".join(checkpoint_contents(out)) or "nothing"
    if mode == "true":
        raise ValueError(
            f"--resume: no complete checkpoint in {where} (found: {found}); resume from a directory that has "
            "one, or pass --resume=auto to start at step 0 when there is none"
        )
    if latest is not None:
        log.warning(
            "starting at step 0 (train.resume=false) although %s holds %s: this run's checkpoints will replace "
            "them; --resume continues from it instead",
            where,
            latest.name,
        )
    elif mode == "auto":
        log.info("starting at step 0 (--resume=auto: no complete checkpoint in %s; found: %s)", where, found)
    else:
        log.info("starting at step 0")
    return None


def _warn_if_schedule_changed(cfg: Config, step: int, saved: dict | None) -> None:
    """A warning when the checkpoint's schedule values (None: not recorded) differ from this run's,
    with the jump of the learning rate that follows."""
    now = schedule_of(cfg)
    changed = {k: v for k, v in (saved or {}).items() if k in now and now[k] != v}
    if not changed:
        return
    old = copy.deepcopy(cfg)
    for key, value in changed.items():
        old.set(key, value, source="checkpoint")
    lr_then = old.optim.lr * lr_lambda(old)(step - 1)  # step s ran at factor(s - 1)
    lr_next, lr_saved = (c.optim.lr * lr_lambda(c)(step) for c in (cfg, old))
    log.warning(
        "resuming step %d with another learning-rate schedule than the checkpoint's (%s): lr %.3g at step %d "
        "becomes %.3g at step %d, where the saved schedule continues at %.3g; pass the saved values to keep it",
        step,
        ", ".join(f"{k} {v} -> {now[k]}" for k, v in changed.items()),
        lr_then,
        step,
        lr_next,
        step + 1,
        lr_saved,
    )


def _non_finite(step: int, loss: float, grad_norm, out: str) -> NonFiniteError:
    return NonFiniteError(
        f"step {step}: loss {loss}, gradient norm {grad_norm}; the optimizer did not step and the "
        f"last checkpoint in {out} is intact. Lower optim.lr or check the data, then --resume"
    )


def lm_loss(kernels: KernelsConfig, model: torch.nn.Module, tokens, positions, ctx, labels) -> torch.Tensor:
    """Summed next-token loss of one row: the hidden states through the chunked vocabulary
    projection, so that ``[tokens, vocab]`` logits never exist whole."""
    core = model.module if hasattr(model, "module") else model  # DDP wraps; the weight is the model's
    hidden = model(tokens, positions, ctx)
    loss, _ = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        core.output_weight.to(hidden.dtype),
        labels,
        reduction="sum",
        chunk_size=kernels.loss_chunk_size,
        backend=kernels.loss,
    )
    return loss


def _step(cfg, update, ctx, batches, dims, dp_cp_group, pp_group, device, agreement=None) -> tuple[float, int, float]:
    """Forward and backward of ``grad_accum`` micro-batches; returns the token-weighted mean loss
    over all data- and context-parallel ranks, the number of tokens it averaged, and the attention
    imbalance of the step: max / mean unmasked pairs per ring rank, the worst over the dp ranks.
    With a `StepAgreement`, one collective agrees on every row's attention inputs up front."""
    micro = []
    local_tokens = torch.zeros((), dtype=torch.float64)
    cp_work = torch.zeros(dims.cp, dtype=torch.float64)
    for _ in range(cfg.train.grad_accum):
        batch = next(batches)
        micro.append(batch)
        local_tokens += int((batch.labels != IGNORE_INDEX).sum())
        cp_work += torch.tensor(batch.cp_work, dtype=torch.float64)
    # cp rank r·U + u is Ulysses rank u of ring rank r; a ring rank's Ulysses ranks split its tokens'
    # work by heads, so the ring ranks are what a layout balances.
    ring_work = cp_work.view(dims.cp_ring, dims.cp_ulysses).sum(1)
    imbalance = torch.tensor([(ring_work.max() / ring_work.mean().clamp_min(1)).item()], dtype=torch.float64)
    dist.all_reduce(imbalance, op=dist.ReduceOp.MAX, group=dp_cp_group)
    total = local_tokens.clone()
    dist.all_reduce(total, group=dp_cp_group)  # every rank divides by the same global count
    n_total = int(total.item())
    if n_total == 0:
        raise ValueError("a step's batches hold no labelled token; check data.seq_len and the corpus")
    if agreement is not None:
        agreement.agree([_row_inputs(cfg, ctx, b, r) for b in micro for r in range(len(b.tokens))])
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per row
    # The engines average gradients over the dp x cp ranks: scale so that they sum instead.
    scale = gradient_scale(dims) / n_total
    for batch in micro:
        if update.runner is not None:  # the pipeline: one row per micro-batch, the loss on the last stage
            update.loss_scale = scale
            side = [
                (batch.positions[r : r + 1].to(device), _row_ctx(cfg, ctx, batch, r)) for r in range(len(batch.tokens))
            ]
            loss_sum += update.runner.run(batch.tokens.to(device), batch.labels.to(device), side)
            continue
        for row in range(batch.tokens.shape[0]):
            row_ctx = _row_ctx(cfg, ctx, batch, row)
            agreed = agreement.row(_row_inputs(cfg, ctx, batch, row)) if agreement else contextlib.nullcontext()
            with agreed:  # forward and backward (its recompute) attend the agreed row
                loss = update.loss(
                    batch.tokens[row : row + 1].to(device),
                    batch.positions[row : row + 1].to(device),
                    row_ctx,
                    batch.labels[row].to(device),
                )
                update.backward(loss * scale)
            loss_sum += loss.detach().double()
    dist.all_reduce(loss_sum, group=dp_cp_group)
    if pp_group is not None:  # only the last stage holds the loss
        dist.all_reduce(loss_sum, group=pp_group)
    return loss_sum.item() / n_total, n_total, imbalance.item()


def _row_ctx(cfg, ctx, batch, row: int):
    """The attention context of one row: its layout, and its packed documents when attention stays
    inside them."""
    row_ctx = ctx.with_documents(batch.cu_seqlens[row] if cfg.data.doc_masking else None)
    return dataclasses.replace(row_ctx, layout=batch.layouts[row])


def _row_inputs(cfg, ctx, batch, row: int) -> RowInputs:
    """What the step agrees on for one row: its token shard's shape, its layout (``auto`` picks one
    per row, so rows of one shape may differ in it) and its packed documents."""
    row_ctx = _row_ctx(cfg, ctx, batch, row)
    data = {"layout code": LAYOUTS.index(row_ctx.layout), **document_fields(row_ctx.documents)}
    return RowInputs(tuple(batch.tokens[row : row + 1].shape), tuple(data.items()))


__all__ = ["MASFormerJob", "NonFiniteError", "train"]
