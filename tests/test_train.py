"""The trainer end to end on gloo ranks with a tiny MASFormer: metrics, parity of the parallel
layouts and data-parallel engines (FSDP2, DDP, DeepSpeed ZeRO 1-3) against one process (loss and
gradient norm per step), bit-exact resume, and the start-up errors. Runs read their numbers back
from ``metrics.jsonl``, as a user would."""

import json
import math
import os
import random

import pytest

from lsts.config import load_config
from lsts.train.checkpoint import latest_checkpoint
from tests.distributed import errors_on_all_ranks, run_ranks

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
    from lsts.train.trainer import train

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


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_data_parallel_equals_one_process_with_the_same_batch(tmp_path, engine):
    one = _run(tmp_path, "dp1", 1, "--data.batch_size=2")
    two = _run(tmp_path, "dp2", 2, "--data.batch_size=1", f"--parallel.dp_engine={engine}")
    _assert_same_run(two, one)


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3"])
def test_deepspeed_zero_equals_one_process_with_the_same_batch(tmp_path, engine):
    one = _run(tmp_path, "dp1", 1, "--data.batch_size=2")
    two = _run(tmp_path, "zero", 2, "--data.batch_size=1", f"--parallel.dp_engine={engine}")
    _assert_same_run(two, one)


def test_deepspeed_zero_over_context_parallel_ranks_with_accumulation_equals_one_process(tmp_path):
    # Two backward calls per optimizer step: DeepSpeed must not divide them by its accumulation steps.
    one = _run(tmp_path, "cp1", 1, "--train.grad_accum=2")
    two = _run(tmp_path, "zero-cp2", 2, "--train.grad_accum=2", "--parallel.cp_ring=2", "--parallel.dp_engine=zero2")
    _assert_same_run(two, one)


def test_tensor_parallel_equals_one_process(tmp_path):
    one = _run(tmp_path, "tp1", 1)
    two = _run(tmp_path, "tp2", 2, "--parallel.tp=2")
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


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    out = str(tmp_path / "nan")
    run_ranks(_train_on_ranks, 1, out, ["--steps=2"])
    errors = run_ranks(_expect_non_finite, 1, out, ["--steps=4", "--resume", "--optim.lr=1e30"])
    assert "optimizer did not step" in errors[0] and "intact" in errors[0]
    assert latest_checkpoint(out).name == "step-000002"


def _expect_non_finite(rank, world, out, extra):
    from lsts.train.trainer import NonFiniteError, train

    try:
        train(_cfg(out, *extra))
    except NonFiniteError as e:
        return str(e)
    raise AssertionError("no NonFiniteError")


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
