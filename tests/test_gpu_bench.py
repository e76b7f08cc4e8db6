"""``bench/gpu.py``, the one-command GPU day, on CPU: ``--dry-run`` runs every section (pytest, the
kernel table, the compile report, ring/Ulysses on gloo ranks, a torchrun training step of the scaled
Llama-3 config) and its report must hold each one's numbers, with no section failing; the scaling
of the training config and the parsing of a pytest run cut short are checked on their own."""

import importlib
import math
import os
import re
import subprocess
import sys

import pytest

from lsts.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, os.path.join(ROOT, "bench"))  # bench/ is a directory of scripts
    try:
        yield importlib.import_module("gpu")
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


def _table(section: str) -> list[dict[str, str]]:
    """The first markdown table of a report section, as one dict per row."""
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_dry_run_exercises_every_section(tmp_path):
    out = tmp_path / "report.md"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + (out.read_text()[-3000:] if out.exists() else "")
    sections = dict(re.findall(r"^## (\w[\w ]*?) \(\d+ s\)\n(.*?)(?=^## |\Z)", out.read_text(), flags=re.M | re.S))
    assert list(sections) == ["tests", "kernels", "compile", "parallel", "train"]

    tests = _table(sections["tests"])
    assert int(tests[0]["passed"]) > 0 and all(r["failed"] == r["error"] == "0" for r in tests)

    kernels = {r["contender"]: r for r in _table(sections["kernels"])}
    assert float(kernels["lsts torch"]["fwd ms"]) > 0 and float(kernels["lsts torch"]["bwd ms"]) > 0
    assert float(kernels["SDPA FlashAttention"]["out diff"]) < 1e-5  # the same attention as lsts'
    assert kernels["SDPA cuDNN"]["note"].startswith("unavailable")  # no cuDNN on CPU: reported, not fatal

    compiled = _table(sections["compile"])
    assert compiled and all(r["arch"] == "sm_90" and r["spill st/ld B"] == "0/0" for r in compiled)

    parallel = {r["method"]: r for r in _table(sections["parallel"])}
    assert set(parallel) == {"ring", "ulysses"}
    assert all(
        r["ranks"] == "2" and float(r["out diff"]) < 1e-5 and float(r["efficiency"]) > 0 for r in parallel.values()
    )

    steps = _table(sections["train"])
    assert [r["step"] for r in steps] == ["1", "2"]
    assert all(math.isfinite(float(r["loss"])) and float(r["tokens/s"]) > 0 for r in steps)


def test_train_config_scales_to_the_gpus_present(gpu_bench):
    config = ["--config", os.path.join(ROOT, gpu_bench.TRAIN_CONFIG)]
    own = load_config(config, world_size=8)
    on_8 = load_config([*config, *gpu_bench.scaled_train_args(8, dry_run=False)], world_size=8)
    assert on_8 == own  # eight GPUs: the config as it is
    for n, ring, uly in ((1, 1, 1), (2, 1, 2), (4, 2, 2), (3, 3, 1)):
        cfg = load_config([*config, *gpu_bench.scaled_train_args(n, dry_run=False)], world_size=n)
        assert (cfg.parallel.cp_ring, cfg.parallel.cp_ulysses) == (ring, uly)
        assert cfg.data.seq_len == 16384 * n and cfg.model.n_layers == 4 * n  # per GPU: what it has on 8
        assert cfg.model.dim == own.model.dim and cfg.model.vocab_size == own.model.vocab_size


def test_a_pytest_run_cut_short_is_still_counted(gpu_bench):
    output = (
        "tests/test_a.py::test_x[f32] PASSED                [ 10%]\n"
        "tests/test_a.py::test_y FAILED                     [ 20%]\n"
        "tests/test_b.py::test_z SKIPPED (no CUDA)          [ 30%]\n"
        "tests/test_b.py::test_w XFAIL (spills)             [ 40%]\n"
        "tests/test_b.py::test_v "  # killed mid-test: no outcome, not counted
    )
    counts, failed = gpu_bench.parse_pytest(output)
    assert counts == {
        ("tests/test_a.py", "PASSED"): 1,
        ("tests/test_a.py", "FAILED"): 1,
        ("tests/test_b.py", "SKIPPED"): 1,
        ("tests/test_b.py", "XFAIL"): 1,
    }
    assert failed == ["tests/test_a.py::test_y"]
