"""The training loop behind ``torchrun launch/train.py``: config -> mesh -> model -> parallelize ->
data -> steps with a token-weighted loss, a non-finite guard, metrics and atomic checkpoints.

Every rank validates the whole configuration against the world before the first collective, so a
bad value is the same clear `ValueError` everywhere, never a hang.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from lsts.config import Config, load_config
from lsts.kernels.loss import linear_cross_entropy
from lsts.models.masformer import MASFormer
from lsts.parallel.comm import init_process_group
from lsts.parallel.dims import ParallelDims
from lsts.parallel.parallelize import check_supported, gradient_scale, parallelize
from lsts.train.checkpoint import Checkpointer
from lsts.train.data import build_data
from lsts.train.metrics import MetricsLogger, device_peak_flops, mfu, peak_memory_gib

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteError(RuntimeError):
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
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    if "RANK" in os.environ:
        init_process_group(backend, timeout=timeout)
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="lsts-"), "rendezvous")
        init_process_group(backend, timeout=timeout, init_method=f"file://{store}", rank=0, world_size=1)
    return True


def check_run(cfg: Config, dims: ParallelDims, world: int) -> None:
    """Everything about the world, the model and the sequence that can be wrong, before collectives."""
    dims.validate(world)
    check_supported(dims, cfg.parallel.dp_engine)
    dims.check_model(cfg.model.n_heads, cfg.model.n_kv_heads)
    dims.check_seq_len(cfg.data.seq_len, cfg.parallel.layout)


def lr_lambda(cfg: Config):
    o, steps = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        decay = 1 - progress if o.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return (o.min_lr + (o.lr - o.min_lr) * decay) / o.lr

    return factor


def train(cfg: Config) -> dict:
    """Run the configured training; returns the last step's metrics."""
    device, dtype = resolve_device(cfg)
    created = init_distributed(cfg, device)
    try:
        return _train(cfg, device, dtype)
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg: Config, device: torch.device, dtype: torch.dtype) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims.from_config(cfg.parallel, world)
    check_run(cfg, dims, world)
    mesh = dims.build_mesh(device.type)
    dp_rank = mesh["dp"].get_local_rank()
    cp_rank = mesh["cp"].get_local_rank()
    if rank == 0:
        os.makedirs(cfg.train.out, exist_ok=True)
        cfg.save(os.path.join(cfg.train.out, "config.yaml"))

    torch.manual_seed(cfg.train.seed)
    model = MASFormer(cfg.model, cfg.kernels).to(device)
    model.init_weights(cfg.train.seed)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    model = parallelize(
        model, dims, mesh, cfg.parallel.dp_engine, cfg.parallel.activation_checkpoint, param_dtype=dtype
    )
    if dims.dp * dims.cp == 1 and dtype != torch.float32:
        model = model.to(dtype)
    core = model.module if hasattr(model, "module") else model
    ctx = dims.attention_context(mesh, cfg.kernels.attention, cfg.parallel.layout)

    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    data = build_data(
        cfg.data,
        dp_rank=dp_rank,
        dp_world=dims.dp,
        cp_rank=cp_rank,
        cp_world=dims.cp,
        layout=cfg.parallel.layout,
        vocab_size=cfg.model.vocab_size,
    )
    ckpt = Checkpointer(
        cfg.train.out, cfg.checkpoint.every, cfg.checkpoint.keep, seed=cfg.train.seed, parallel_dims=dims.to_dict()
    )
    start = 0
    if cfg.train.resume:
        start = ckpt.load_latest(model, optimizer, scheduler, data) or 0
        # The saved learning rate followed the saved run's schedule; continue on this run's schedule.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
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
    metrics: dict = {}
    batches = iter(data)
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            loss, n_tokens = _step(cfg, model, core, ctx, batches, dims, dp_cp_group, device, dtype)
            grad_norm = _clip(model, cfg.optim.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise NonFiniteError(
                    f"step {step}: loss {loss}, gradient norm {grad_norm}; the optimizer did not step and the "
                    f"last checkpoint in {cfg.train.out} is intact. Lower optim.lr or check the data, then --resume"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
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
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                logger.log(step, **metrics)
            ckpt.maybe_save(step, model, optimizer, scheduler, data, force=step == cfg.train.steps)
    finally:
        logger.close()
    return {"step": cfg.train.steps, **metrics}


def _step(cfg, model, core, ctx, batches, dims, dp_cp_group, device, dtype) -> tuple[float, int]:
    """Forward and backward of ``grad_accum`` micro-batches; returns the token-weighted mean loss
    over all data- and context-parallel ranks and the number of tokens it averaged."""
    micro = []
    local_tokens = torch.zeros((), dtype=torch.float64)
    for _ in range(cfg.train.grad_accum):
        batch = next(batches)
        micro.append(batch)
        local_tokens += int((batch.labels != -100).sum())
    total = local_tokens.clone()
    dist.all_reduce(total, group=dp_cp_group)  # every rank divides by the same global count
    n_total = int(total.item())
    if n_total == 0:
        raise ValueError("a step's batches hold no labelled token; check data.seq_len and the corpus")
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in micro:
        for row in range(batch.tokens.shape[0]):
            row_ctx = ctx.with_documents(batch.cu_seqlens[row] if cfg.data.doc_masking else None)
            tokens = batch.tokens[row : row + 1].to(device)
            hidden = model(tokens, batch.positions[row : row + 1].to(device), row_ctx)
            loss, _ = linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                core.output_weight.to(hidden.dtype),
                batch.labels[row].to(device),
                reduction="sum",
                chunk_size=cfg.kernels.loss_chunk_size,
                backend=cfg.kernels.loss,
            )
            # The engines average gradients over the dp x cp ranks: scale so that they sum instead.
            (loss * (gradient_scale(dims) / n_total)).backward()
            loss_sum += loss.detach().double().cpu()
    dist.all_reduce(loss_sum, group=dp_cp_group)
    return loss_sum.item() / n_total, n_total


def _clip(model, max_norm: float) -> float:
    """Global gradient norm over every parameter — plain, FSDP-sharded or tensor-parallel DTensor
    alike (a DTensor's norm is reduced over its mesh) — then clip in place to ``max_norm``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    squares = []
    for g in grads:
        n = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares.append((n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2)
    norm = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return float(norm)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load_config(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    train(cfg)


__all__ = ["NonFiniteError", "main", "train"]
