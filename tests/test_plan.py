"""The pre-flight planner (`launch/plan.py`, `lsts.planner`) against the runs it predicts: the peak
resident set per rank that the trainer logs (``mem_gib``) for 2-rank CPU runs within ±15 %, the
sequence-parallel bytes a ring step sends equal to the ones counted on the wire (the bench's
`count_sent_bytes`), and the CLI's JSON, GPU roofline, offload accounting, search and errors.

The measured runs are ``torchrun launch/train.py`` as a user types it (through
``tests/plan_measure.py``, which only adds the byte counter). The grid is small by default (one
sequence length, checkpointing off and on); ``-m slow`` adds longer sequences."""

import json
import os
import subprocess
import sys

import pytest

from lsts.config import load_config
from lsts.models.masformer import MASFormer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "launch", "plan.py")
TOLERANCE = 0.15
# Two steps: the second runs with AdamW's state resident, as every later one does.
RUN = ["--steps=2", "--metrics.progress_bar=false", "--checkpoint.every=0"]


def _env(tmp_path):
    # A fresh cache: the start-up is measured by this test, not read from an earlier run's file.
    return {**os.environ, "PYTHONPATH": ROOT, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _plan(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PLAN, *args], capture_output=True, text=True, env=_env(tmp_path))


def _plan_json(tmp_path, *args) -> dict:
    done = _plan(tmp_path, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _measure(tmp_path, *args, env=None) -> dict:
    """``mem_gib`` of the last step and the sequence-parallel bytes rank 0 sent per step."""
    out = tmp_path / "run"
    counted = tmp_path / "sent.json"
    script = os.path.join(ROOT, "tests", "plan_measure.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*torchrun, script, str(counted), *RUN, f"--out={out}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**_env(tmp_path), **(env or {})}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        mem = [json.loads(line)["mem_gib"] for line in f][-1]
    with open(counted) as f:
        sent = json.load(f)["sent"]
    return {"mem_gib": mem, "sent_per_step": sent / 2}


NO_AC, FULL_AC = "--parallel.activation_checkpoint=none", "--parallel.activation_checkpoint=full"
TILES_OFFLOAD = ["--parallel.mlp_tile_tokens=1024", FULL_AC, "--parallel.activation_offload=true"]
SLOW = pytest.mark.slow
# glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed; later blocks below
# it come from the heap, whose freed holes stay resident. At 64K tokens the fragments of 8-24 MiB
# activations add ~0.2 GiB that no tensor accounts for (measured: 1.11 GiB against 0.83 with the
# threshold fixed; docs/benchmarks.md). The planner counts tensors, so that run fixes the threshold.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
GRID = [
    pytest.param(["--seq-len=16384", NO_AC], None, id="16k-no-ac"),
    pytest.param(["--seq-len=16384", FULL_AC], None, id="16k-full-ac"),
    pytest.param(["--seq-len=32768", NO_AC], None, id="32k-no-ac", marks=SLOW),
    pytest.param(["--seq-len=32768", FULL_AC], None, id="32k-full-ac", marks=SLOW),
    pytest.param(["--seq-len=32768", *TILES_OFFLOAD], None, id="32k-tiles-offload", marks=SLOW),
    pytest.param(["--seq-len=65536", FULL_AC], FIXED_MMAP, id="64k-full-ac-fixed-mmap", marks=SLOW),
]


@pytest.mark.parametrize(("args", "env"), GRID)
def test_predicted_peak_rss_and_ring_bytes_match_a_two_rank_cpu_run(tmp_path, args, env):
    predicted = _plan_json(tmp_path, "--nproc=2", *RUN, *args)
    measured = _measure(tmp_path, *args, env=env)
    error = predicted["peak_gib_per_rank"] / measured["mem_gib"] - 1
    comm = predicted["comm_bytes"]
    # The rows of the validation table in docs/benchmarks.md (pytest -s shows them).
    print(f"| {' '.join(args)} | {predicted['peak_gib_per_rank']:.3f} | {measured['mem_gib']:.3f} | {error:+.1%} | "
          f"{comm.get('ring', 0) + comm.get('halo', 0)} | {measured['sent_per_step']:.0f} |")  # fmt: skip
    assert abs(error) <= TOLERANCE, f"predicted {predicted['peak_gib_per_rank']:.3f} GiB, measured {measured}"
    assert comm.get("ring", 0) + comm.get("halo", 0) == measured["sent_per_step"]


def test_json_holds_the_breakdown_and_the_model_flops(tmp_path):
    args = ["--seq-len=512", "--model.n_layers=2"]
    p = _plan_json(tmp_path, "--nproc=1", *args)
    for key in ("peak_gib_per_rank", "step_flops", "memory", "comm_bytes", "layers", "layout"):
        assert key in p
    assert set(p["memory"]) >= {"params", "grads", "optimizer", "activations", "loss_chunk", "process_start"}
    assert p["peak_gib_per_rank"] * 2**30 >= sum(p["memory"].values()) > 0
    cfg = load_config(args)
    assert p["step_flops"] == MASFormer(cfg.model).flops_per_token(512) * 512  # the trainer's MFU numerator
    assert sorted(p["layers"], key=int) == ["0", "1"]
    assert p["comm_buffers_in_activations"] == 0 and p["comm_bytes"] == {}  # one rank sends nothing


@SLOW  # two planner runs (~45 s on the shared cores)
def test_per_pack_layouts_are_planned_as_zigzag(tmp_path):
    """balanced and auto hold N/P tokens a rank and send the K/V blocks zigzag sends."""
    args = ["--nproc=2", "--seq-len=512", "--model.n_layers=2", "--parallel.cp_ring=2"]
    zigzag, auto = (_plan_json(tmp_path, *args, f"--parallel.layout={layout}") for layout in ("zigzag", "auto"))
    assert auto["comm_bytes"] == zigzag["comm_bytes"] and auto["comm_bytes"]
    assert auto["peak_gib_per_rank"] == pytest.approx(zigzag["peak_gib_per_rank"], rel=0.02)


def test_gpu_prediction_counts_bf16_weights_and_adam_state_and_a_roofline(tmp_path):
    args = ["--seq-len=1024", "--model.n_layers=2", "--model.dim=128", "--model.n_heads=4"]
    p = _plan_json(tmp_path, "--nproc=1", "--gpu=h100-80gb", *args)
    cfg = load_config(args)
    weights = list(MASFormer(cfg.model).parameters())
    n = sum(w.numel() for w in weights)
    assert p["memory"]["params"] == 2 * n  # one rank trains the bf16 module as it is
    # AdamW's two moments in the same dtype, and a float32 step count per tensor.
    assert p["memory"]["optimizer"] == 2 * 2 * n + 4 * len(weights)
    assert "process_start" not in p["memory"]  # CUDA's figure is the allocator's: tensors only
    t = p["step_time_s"]
    assert t["compute"] == pytest.approx(p["step_flops"] / 989e12) and t["step"] >= t["compute"]


def test_offload_on_a_gpu_moves_each_block_input_to_the_host(tmp_path):
    seq, dim, layers = 2048, 128, 3
    args = ["--nproc=1", "--gpu=h100-80gb", f"--seq-len={seq}", f"--model.n_layers={layers}", f"--model.dim={dim}",
            "--parallel.activation_checkpoint=full"]  # fmt: skip
    kept = _plan_json(tmp_path, *args)
    offloaded = _plan_json(tmp_path, *args, "--parallel.activation_offload=true")
    block_inputs = layers * seq * dim * 2  # one bf16 [seq, dim] input per checkpointed block
    assert offloaded["host_offload_bytes"] == block_inputs
    assert kept["memory"]["activations"] - offloaded["memory"]["activations"] == block_inputs


def test_search_prints_a_fitting_layout_with_its_longest_sequence(tmp_path):
    done = _plan(tmp_path, "--nproc=1", "--seq-len=512", "--model.n_layers=1", "--budget-gib=4", "--search")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("layouts that fit 4.00 GiB per rank") and len(lines) >= 3
    longest = [int(line.split()[-1]) for line in lines[2:]]
    assert all(s >= 512 for s in longest)


def test_longest_sequence_of_the_default_layout_is_a_multiple_of_its_divisor():
    # cp_ring = -1 (the default) is resolved against the world, and a configured length equal to the fit's
    # second point is traced rather than taken from a prediction that was not given.
    from lsts.planner.search import longest_sequence

    cfg = load_config(["--seq-len=4096", "--model.n_layers=1"], world_size=2)
    s = longest_sequence(cfg, 2, "h100-80gb", budget=0.5 * 2**30)
    assert s > 4096 and s % 4 == 0


def test_bad_input_is_one_error_line(tmp_path):
    done = _plan(tmp_path, "--nproc=2", "--gpu=h100", "--json")
    assert done.returncode == 2 and "unknown --gpu 'h100'" in done.stderr
    done = _plan(tmp_path, "--nproc=3", "--parallel.cp_ring=2", "--json")
    assert done.returncode == 2 and done.stderr.startswith("error:")
