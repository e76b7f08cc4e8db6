"""The trainer end to end on gloo ranks with a tiny MASFormer: metrics, parity of the parallel
layouts against one process (loss and gradient norm per step, read back from ``metrics.jsonl`` as a
user would), parity of the engines (FSDP2, DDP, tensor parallelism, DeepSpeed ZeRO 1-3: every
parameter's gradient and updated value, in float64 where the engine keeps it), bit-exact resume,
the non-finite guards, a collective timeout, and the start-up errors."""

import json
import math
import os
import random
import time

import pytest
import torch
import torch.distributed as dist

from lsts.config import load_config
from lsts.train.checkpoint import latest_checkpoint
from lsts.train.trainer import MASFormerJob, NonFiniteError, train
from tests.distributed import errors_on_all_ranks, run_ranks
from tests.oracle import rel_err

TINY = [
    "--model.dim=32",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.full_layers=top",
    "--model.n_full=1",
    "--model.span_size=24",
    "--optim.warmup_steps=1",
    "--optim.lr=3e-3",
    "--checkpoint.every=2",
    "--metrics.tensorboard=false",
    "--metrics.progress_bar=false",
    "--kernels.attention=torch",
    "--kernels.loss=torch",
    # Data parallelism fills the world unless a test sets other degrees (the demo default is cp).
    "--parallel.cp_ring=1",
    "--parallel.dp_shard=-1",
]


def _cfg(out, *extra):
    return load_config([*TINY, "--seq-len=128", "--steps=3", f"--out={out}", *extra])


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_on_ranks(rank, world, out, extra):
    return train(_cfg(out, *extra))


def _run(tmp_path, name, world, *extra):
    out = str(tmp_path / name)
    run_ranks(_train_on_ranks, world, out, list(extra))
    return _metrics(out)


def _assert_same_run(a, b, tol=2e-5):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= tol * abs(y[key]), (key, x, y)


def test_single_process_run_writes_metrics_config_and_checkpoint(tmp_path):
    rows = _run(tmp_path, "one", 1, "--steps=4")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "tokens_per_sec", "mem_gib", "grad_norm", "lr"} <= r.keys()
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert os.path.exists(tmp_path / "one" / "config.yaml")
    assert any(p.startswith("step-000004") for p in os.listdir(tmp_path / "one" / "checkpoints"))


@pytest.mark.parametrize(
    "layout_args",
    [
        pytest.param(["--parallel.cp_ring=2"], id="ring"),
        pytest.param(["--parallel.cp_ulysses=2"], id="ulysses"),
    ],
)
def test_context_parallel_equals_one_process(tmp_path, layout_args):
    one = _run(tmp_path, "cp1", 1)
    two = _run(tmp_path, "cp2", 2, *layout_args)
    _assert_same_run(two, one)


def test_ulysses_with_heads_it_does_not_divide_equals_one_process(tmp_path):
    heads = ["--model.dim=24", "--model.n_heads=3", "--model.n_kv_heads=1"]
    two = _run(tmp_path, "u2", 2, *heads, "--parallel.cp_ulysses=2")
    _assert_same_run(two, _run(tmp_path, "one", 1, *heads))
    assert all(r["cp_imbalance"] == 1.0 for r in two)  # both Ulysses ranks attend every token


def _short_documents(tmp_path) -> str:
    """A corpus of 5-60 byte documents: a 128-token window packs several, cut anywhere."""
    rng = random.Random(0)
    path = tmp_path / "short.jsonl"
    with open(path, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": "".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(5, 60)))}) + "\n")
    return str(path)


def test_layouts_by_documents_on_packed_data_equal_one_process(tmp_path):
    data = f"--data.dataset={_short_documents(tmp_path)}"
    one = _run(tmp_path, "cp1", 1, data)
    runs = {
        layout: _run(tmp_path, layout, 2, data, "--parallel.cp_ring=2", f"--parallel.layout={layout}")
        for layout in ("balanced", "auto", "zigzag")
    }
    for layout in ("balanced", "auto"):
        _assert_same_run(runs[layout], one)
    assert all("cp_imbalance" not in r for r in one)
    for step, (bal, auto, zig) in enumerate(zip(*(runs[name] for name in ("balanced", "auto", "zigzag")))):
        imbalance = [r["cp_imbalance"] for r in (bal, auto, zig)]
        assert all(x >= 1 for x in imbalance), (step, imbalance)
        assert imbalance[1] <= min(imbalance[0], imbalance[2]) + 1e-12, (step, imbalance)  # auto: the better
    assert sum(r["cp_imbalance"] for r in runs["balanced"]) < sum(r["cp_imbalance"] for r in runs["zigzag"])



class _RecordingJob(MASFormerJob):
    """The default job, built in ``dtype``, that records at every optimizer step each parameter's
    whole gradient (before the update) and whole value (after it), by name, in float64 on the CPU."""

    def __init__(self, cfg, dtype: torch.dtype) -> None:
        super().__init__(cfg)
        self.dtype = dtype
        self.grads: list[dict] = []
        self.params: list[dict] = []

    def build(self, dims, mesh, device, dtype):
        update, flops_per_token = super().build(dims, mesh, device, self.dtype)
        step = update.step

        def recording_step():
            self.grads.append(_whole(update, "grad"))
            result = step()
            self.params.append(_whole(update, "param"))
            return result

        update.step = recording_step
        return update, flops_per_token


def _whole(update, kind: str) -> dict:
    """Every parameter's gradient or value, gathered whole from FSDP2 / tensor-parallel shards or
    DeepSpeed's partitions, under the plain model's names."""
    from lsts.train.zero import ZeroUpdate

    if isinstance(update, ZeroUpdate):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        model, get = update.engine.module.model, safe_get_full_grad if kind == "grad" else safe_get_full_fp32_param
    else:
        model = (
            update.model.module if isinstance(update.model, torch.nn.parallel.DistributedDataParallel) else update.model
        )
        get = (lambda p: p.grad) if kind == "grad" else (lambda p: p)
    whole = {}
    for name, p in model.named_parameters():
        t = get(p).detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        whole[name] = t.double().cpu().clone().numpy()  # a copy; numpy: pickled by value to the test
    return whole


def _recorded_run(rank, world, out, extra, dtype):
    # MASFormer creates its parameters and buffers in the default dtype: float64 for the whole run.
    torch.set_default_dtype(dtype)
    try:
        job = _RecordingJob(_cfg(out, *extra), dtype)
        train(job.cfg, job)
    finally:
        torch.set_default_dtype(torch.float32)
    return job.grads, job.params


# Engine, its arguments on two ranks, the dtype it trains in, the tolerance. DDP and tensor
# parallelism keep float64 through; FSDP2 reduces gradients in float32 (lsts' mixed-precision
# policy); DeepSpeed ZeRO takes half and float32 parameters only.
ENGINES = [
    pytest.param(["--parallel.dp_engine=ddp", "--data.batch_size=1"], torch.float64, 1e-10, id="ddp"),
    pytest.param(["--parallel.dp_engine=fsdp2", "--data.batch_size=1"], torch.float64, 1e-5, id="fsdp2"),
    pytest.param(["--parallel.tp=2", "--parallel.dp_shard=1", "--data.batch_size=2"], torch.float64, 1e-10, id="tp"),
    *(
        pytest.param([f"--parallel.dp_engine={e}", "--data.batch_size=1"], torch.float32, 1e-5, id=e)
        for e in ("zero1", "zero2", "zero3")
    ),
]


@pytest.mark.parametrize("engine_args,dtype,tol", ENGINES)
def test_engine_gradients_and_updates_equal_one_process(tmp_path, engine_args, dtype, tol):
    """Three steps with the same two rows per step: on two ranks (one row each, or tensor-parallel
    halves of every block) and in one process; the gradients are clipped (grad_clip 1) on the way."""
    same = ["--steps=3"]
    one_grads, one_params = run_ranks(_recorded_run, 1, str(tmp_path / "one"), [*same, "--data.batch_size=2"], dtype)[0]
    for rank, (grads, params) in enumerate(
        run_ranks(_recorded_run, 2, str(tmp_path / "two"), [*same, *engine_args], dtype)
    ):
        for what, got, want in (("gradient", grads, one_grads), ("parameter", params, one_params)):
            assert len(got) == len(want) == 3
            for step, (a, b) in enumerate(zip(got, want), start=1):
                assert a.keys() == b.keys()
                errors = {name: rel_err(torch.from_numpy(a[name]), torch.from_numpy(b[name])) for name in b}
                bad = {name: f"{e:.1e}" for name, e in errors.items() if not e <= tol}
                assert not bad, f"rank {rank} step {step}: {what}s differ: {bad}"
    # The updates moved every parameter (a comparison of untouched weights would prove nothing).
    assert all((one_params[0][name] != one_params[-1][name]).any() for name in one_params[0])


def test_deepspeed_zero_over_context_parallel_ranks_with_accumulation_equals_one_process(tmp_path):
    # Two backward calls per optimizer step: DeepSpeed must not divide them by its accumulation steps.
    one = _run(tmp_path, "cp1", 1, "--train.grad_accum=2")
    two = _run(tmp_path, "zero-cp2", 2, "--train.grad_accum=2", "--parallel.cp_ring=2", "--parallel.dp_engine=zero2")
    _assert_same_run(two, one)


@pytest.mark.parametrize(
    "mix,batch",
    [
        pytest.param(["--parallel.dp_shard=2", "--parallel.cp_ring=2", "--data.batch_size=1"], 2, id="dp2xcp2"),
        pytest.param(["--parallel.tp=2", "--parallel.cp_ring=2", "--data.batch_size=2"], 2, id="tp2xcp2"),
        # HSDP: FSDP2 over 2 shards, replicated twice; 4 data-parallel ranks of one row each.
        pytest.param(
            ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.cp_ring=1", "--data.batch_size=1"],
            4,
            id="hsdp-r2xs2",
        ),
    ],
)
def test_four_rank_mixes_equal_one_process(tmp_path, mix, batch):
    one = _run(tmp_path, "one", 1, f"--data.batch_size={batch}")
    four = _run(tmp_path, "four", 4, *mix)
    _assert_same_run(four, one)


PIPE = ["--model.tie_embeddings=false", "--model.n_layers=3", "--data.batch_size=2", "--parallel.pp_microbatches=2"]


@pytest.mark.parametrize(
    "layout_args,world",
    [
        pytest.param(["--parallel.pp=2"], 2, id="pp2"),
        pytest.param(["--parallel.pp=2", "--parallel.cp_ring=2"], 4, id="pp2xcp2"),
    ],
)
def test_pipeline_parallel_equals_one_process(tmp_path, layout_args, world):
    one = _run(tmp_path, "pp1", 1, *PIPE)
    piped = _run(tmp_path, "pp2", world, *PIPE, *layout_args)
    _assert_same_run(piped, one)


def test_pipeline_checkpoint_resumes_in_one_process(tmp_path):
    out = str(tmp_path / "reshard")
    run_ranks(_train_on_ranks, 2, out, [*PIPE, "--parallel.pp=2", "--steps=2"])
    run_ranks(_train_on_ranks, 1, out, [*PIPE, "--steps=3", "--resume"])
    _assert_same_run(_metrics(out)[-1:], _run(tmp_path, "straight", 1, *PIPE)[-1:])


@pytest.mark.parametrize(
    "name,memory",
    [
        ("full", ["--parallel.activation_checkpoint=full"]),
        ("selective", ["--parallel.activation_checkpoint=selective"]),
        ("offload+tiles", ["--parallel.activation_checkpoint=full", "--parallel.activation_offload=true",
                           "--parallel.mlp_tile_tokens=24"]),
    ],
)  # fmt: skip
def test_memory_passes_change_nothing_but_memory(tmp_path, name, memory):
    plain = _run(tmp_path, "plain", 2, "--parallel.cp_ring=2")
    recomputed = _run(tmp_path, name, 2, "--parallel.cp_ring=2", *memory)
    _assert_same_run(recomputed, plain, tol=1e-6)


@pytest.mark.parametrize("world", [1, 2])
def test_compiled_blocks_train_like_eager(tmp_path, world):
    """train.compile: each block through inductor (whole-graph on one rank; ring attention on two
    keeps its collectives outside the graph) gives the eager run's losses and gradient norms."""
    eager = _run(tmp_path, "eager", world, "--steps=3")
    compiled = _run(tmp_path, "compiled", world, "--steps=3", "--train.compile=true")
    _assert_same_run(compiled, eager, tol=1e-4)


def test_non_finite_gradient_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    # A learning rate of 1e30 blows the weights up in step 3: its gradient is non-finite.
    out = str(tmp_path / "nan")
    run_ranks(_train_on_ranks, 1, out, ["--steps=2"])
    errors = run_ranks(_expect_non_finite, 1, out, ["--steps=4", "--resume", "--optim.lr=1e30"])
    assert "optimizer did not step" in errors[0] and "intact" in errors[0]
    assert "gradient norm not computed" not in errors[0]  # the gradient check fired, not the loss check
    assert latest_checkpoint(out).name == "step-000002"


def _expect_non_finite(rank, world, out, extra):
    try:
        train(_cfg(out, *extra))
    except NonFiniteError as e:
        return str(e)
    raise AssertionError("no NonFiniteError")


class _NanLossJob(MASFormerJob):
    """The default job whose loss turns NaN in step 2 (the loss itself, so that the trainer's loss
    check fires before any gradient norm is taken); keeps the parameters as step 2 found them."""

    def build(self, dims, mesh, device, dtype):
        update, flops_per_token = super().build(dims, mesh, device, dtype)
        self.update, self.step, loss = update, 0, update.loss
        update.loss = lambda *row: loss(*row) * (float("nan") if self.step == 2 else 1.0)
        return update, flops_per_token

    def before_step(self, step):
        self.step = step
        if step == 2:
            self.before = {n: p.detach().clone() for n, p in self.update.model.named_parameters()}


def _nan_loss_run(rank, world, out):
    job = _NanLossJob(_cfg(out, "--steps=3"))
    try:
        train(job.cfg, job)
    except NonFiniteError as e:
        untouched = all(torch.equal(job.before[n], p) for n, p in job.update.model.named_parameters())
        return str(e), untouched, job.update.scheduler.last_epoch
    raise AssertionError("no NonFiniteError")


def test_non_finite_loss_stops_before_the_update(tmp_path):
    out = str(tmp_path / "nan-loss")
    [(message, untouched, scheduler_steps)] = run_ranks(_nan_loss_run, 1, out)
    assert message.startswith("step 2: loss nan, gradient norm not computed; the optimizer did not step"), message
    assert f"last checkpoint in {out} is intact" in message and "--resume" in message
    assert untouched and scheduler_steps == 1  # step 1's update only


class _StalledRankJob(MASFormerJob):
    """Rank 1 misses step 2's first collective: it waits instead for a message that rank 0 never
    sends, while rank 0 waits in the all-reduce that rank 1 skipped."""

    def before_step(self, step):
        if step == 2:
            self.stalled_at = time.monotonic()
            if dist.get_rank() == 1:
                dist.recv(torch.zeros(1), src=0)


def _stalled_run(rank, world, out, timeout_s):
    from lsts.train.trainer import init_distributed

    job = _StalledRankJob(_cfg(out, f"--parallel.timeout_s={timeout_s}", "--parallel.dp_engine=ddp"))
    # The group is lsts' own (parallel.timeout_s), made here so that it outlives train(): a rank that
    # fails first must not close the connections under its peer's wait.
    init_distributed(job.cfg, torch.device("cpu"))
    try:
        train(job.cfg, job)
    except Exception as e:
        failed_after = time.monotonic() - job.stalled_at
        message = f"{type(e).__name__}: {e}"
    else:
        raise AssertionError(f"rank {rank}: the run finished")
    time.sleep(timeout_s)  # the peer's own timeout fires meanwhile
    dist.destroy_process_group()
    return message, failed_after


def test_a_rank_that_skips_a_collective_fails_every_rank_within_the_timeout(tmp_path):
    timeout_s = 5
    results = run_ranks(_stalled_run, 2, str(tmp_path / "stall"), timeout_s, own_group=True, timeout=120)
    timed_out = ["timed out" in message.lower() for message, _ in results]
    # gloo gives up on the connection of a timed-out wait: a peer still waiting may see it closed
    # (a moment before its own timeout) rather than time out itself.
    assert any(timed_out), results
    for rank, (message, failed_after) in enumerate(results):
        assert timed_out[rank] or "Connection closed by peer" in message, f"rank {rank}: {message}"
        # Not before the timeout; well before the 10-minute default (slack for a busy machine).
        assert timeout_s * 0.9 <= failed_after <= timeout_s + 10, f"rank {rank}: {failed_after:.1f} s"


def test_resume_is_bit_exact(tmp_path):
    straight = _run(tmp_path, "straight", 2, "--parallel.cp_ring=2", "--steps=4")
    out = str(tmp_path / "resumed")
    run_ranks(_train_on_ranks, 2, out, ["--parallel.cp_ring=2", "--steps=2"])
    run_ranks(_train_on_ranks, 2, out, ["--parallel.cp_ring=2", "--steps=4", "--resume"])
    resumed = _metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]


def test_deepspeed_zero_resume_is_bit_exact(tmp_path):
    zero2 = ["--parallel.dp_engine=zero2", "--data.batch_size=1"]
    straight = _run(tmp_path, "straight", 2, *zero2, "--steps=4")
    out = str(tmp_path / "resumed")
    run_ranks(_train_on_ranks, 2, out, [*zero2, "--steps=2"])
    assert latest_checkpoint(out).name == "step-000002"
    run_ranks(_train_on_ranks, 2, out, [*zero2, "--steps=4", "--resume"])
    resumed = _metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [(m["loss"], m["grad_norm"]) for m in resumed] == [(m["loss"], m["grad_norm"]) for m in straight]


def test_deepspeed_zero_checkpoint_refuses_another_world_size_or_engine(tmp_path):
    out = str(tmp_path / "zero")
    run_ranks(_train_on_ranks, 2, out, ["--parallel.dp_engine=zero2", "--data.batch_size=1", "--steps=1"])
    errors = errors_on_all_ranks(_train_on_ranks, 1, out, ["--parallel.dp_engine=zero2", "--steps=2", "--resume"])
    assert all("ds_to_universal" in e for e in errors), errors
    errors = errors_on_all_ranks(_train_on_ranks, 2, out, ["--data.batch_size=1", "--steps=2", "--resume"])
    assert all("'deepspeed-zero2' engine state" in e for e in errors), errors


def _zero_step_with_a_nan_gradient(rank, world, engine):
    import deepspeed
    import torch

    from lsts.train.zero import ZeroUpdate

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    update = ZeroUpdate(
        model,
        _cfg("unused", f"--parallel.dp_engine={engine}"),
        torch.device("cpu"),
        torch.float32,
        loss_fn=lambda m, x, *_: m(x).square().sum(),
        schedule=lambda step: 1.0,
        backward_calls=1,
        dp_cp_size=world,
    )
    model.weight.register_hook(lambda g: torch.full_like(g, float("nan")))  # the loss stays finite
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        before = [p.detach().clone() for p in model.parameters()]
    loss = update.loss(torch.ones(2, 8), None, None, None)
    update.backward(loss)
    grad_norm, _, applied = update.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return float(loss), grad_norm, applied, unchanged, update.scheduler.last_epoch


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3"])
def test_deepspeed_zero_skips_a_non_finite_gradient(engine):
    [(loss, grad_norm, applied, unchanged, scheduler_steps)] = run_ranks(_zero_step_with_a_nan_gradient, 1, engine)
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert not applied and unchanged and scheduler_steps == 0


def test_resume_reshards_cp2_checkpoint_into_one_process(tmp_path):
    out = str(tmp_path / "reshard")
    run_ranks(_train_on_ranks, 2, out, ["--parallel.cp_ring=2", "--steps=2"])
    run_ranks(_train_on_ranks, 1, out, ["--steps=3", "--resume"])
    straight = _run(tmp_path, "straight", 1)
    _assert_same_run(_metrics(out)[-1:], straight[-1:])


@pytest.mark.parametrize(
    "extra,match",
    [
        pytest.param(["--parallel.cp_ring=3", "--seq-len=132"], "do not fit a world of 2", id="world-mismatch"),
        pytest.param(["--parallel.cp_ring=2", "--seq-len=130"], "multiple of 4", id="seq-len"),
        pytest.param(
            ["--parallel.cp_ulysses=2", "--model.dim=8", "--model.n_heads=1", "--model.n_kv_heads=1"],
            "cp_ulysses",
            id="heads",
        ),
        pytest.param(["--parallel.tp=2", "--parallel.dp_engine=zero2"], "set tp=1 and pp=1", id="zero-with-tp"),
    ],
)
def test_bad_runs_fail_on_every_rank_with_the_fix(tmp_path, extra, match):
    errors = errors_on_all_ranks(_train_on_ranks, 2, str(tmp_path / "bad"), extra)
    assert all(match in e for e in errors), errors
