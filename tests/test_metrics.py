"""Metrics: strict JSON lines with the standard columns, rank 0 only, one timeline on resume,
readable TensorBoard events, a progress bar; memory, peak FLOP/s and MFU helpers."""

import json
import logging
import math
import re
import sys

import pytest
import torch

from lsts.train.metrics import (
    JSONL,
    STANDARD_KEYS,
    TB_DIR,
    MetricsLogger,
    device_peak_flops,
    mfu,
    peak_flops_by_name,
    peak_memory_gib,
)


def _quiet(out, rank=0, total=10, **kw):
    kw = {"tensorboard": False, "progress_bar": False, **kw}
    return MetricsLogger(out, rank, total, **kw)


def _strict_lines(path):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _steps(path):
    return [row["step"] for row in _strict_lines(path)]


def test_jsonl_lines_are_strict_json_with_the_standard_keys(tmp_path):
    with _quiet(tmp_path) as logger:
        logger.log(1, loss=2.5, tokens_per_sec=1000.0, mem_gib=0.5, grad_norm=1.0, lr=1e-3, mfu=None)
        logger.log(2, loss=torch.tensor(2.25), lr=torch.tensor(1e-3, dtype=torch.float64), step_time_s=0.1)
        logger.log(3, loss=math.nan, grad_norm=math.inf)
    rows = _strict_lines(tmp_path / JSONL)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(STANDARD_KEYS) <= row.keys()
    assert rows[1]["loss"] == 2.25 and rows[1]["step_time_s"] == 0.1 and rows[1]["mfu"] is None
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None  # NaN / inf become null


def test_ranks_other_than_zero_write_nothing(tmp_path):
    with MetricsLogger(tmp_path / "run", 1, 10, tensorboard=True, progress_bar=True) as logger:
        logger.log(1, loss=1.0)
    assert not (tmp_path / "run").exists()


def test_resume_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    with _quiet(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, loss=float(step))
    with open(tmp_path / JSONL, "a") as f:
        f.write('{"step": 6, "loss')  # a crash mid-line
    with _quiet(tmp_path, start_step=3) as logger:
        assert _steps(tmp_path / JSONL) == [1, 2, 3]
        logger.log(4, loss=4.0)
    assert _steps(tmp_path / JSONL) == [1, 2, 3, 4]


def test_a_fresh_run_starts_an_empty_file(tmp_path):
    with _quiet(tmp_path) as logger:
        logger.log(1, loss=1.0)
    with _quiet(tmp_path) as logger:
        logger.log(1, loss=0.5)
    assert [row["loss"] for row in _strict_lines(tmp_path / JSONL)] == [0.5]


def test_tensorboard_events_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with _quiet(tmp_path, tensorboard=True, jsonl=False) as logger:
        logger.log(1, loss=3.0, lr=1e-3)
        logger.log(2, loss=2.0, lr=1e-3)
    events = EventAccumulator(str(tmp_path / TB_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0), (2, 2.0)]
    assert not (tmp_path / JSONL).exists()


def test_progress_bar_shows_loss_and_throughput_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with MetricsLogger(tmp_path, 0, 4, tensorboard=False, jsonl=False, start_step=1) as logger:
        logger.log(2, loss=1.5, tokens_per_sec=2048.0)
        logger.log(4, loss=1.25, tokens_per_sec=4096.0)
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=1.2500" in err and "tok/s=4,096" in err


def test_each_logged_step_is_a_line_and_a_file_gets_no_bar(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="lsts.train.metrics")
    with MetricsLogger(tmp_path, 0, 10, tensorboard=False, jsonl=False, start_step=2) as logger:
        logger.log(3, loss=1.5, tokens_per_sec=2048.0, mem_gib=1.5, grad_norm=0.25, lr=3e-4)
    assert "\r" not in capsys.readouterr().err  # stderr is not a terminal here: no bar
    [line] = caplog.messages
    head, eta = line.rsplit(" | ETA ", 1)
    assert head == "step 3/10 | loss 1.5000 | 2,048 tok/s | mem 1.50 GiB | grad norm 0.25 | lr 3.00e-04"
    assert re.fullmatch(r"\d+:\d\d:\d\d", eta)  # 7 more steps at the rate of the one since step 2


def test_peak_memory_is_positive_on_cpu():
    assert 0 < peak_memory_gib("cpu") < 1024


def test_no_mfu_without_a_known_peak():
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert mfu(6e9, 1e4, 8, None) is None


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA H200", torch.float16, 989e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L40S", torch.bfloat16, 362e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, None),
        ("NVIDIA GeForce GTX 1080", torch.float16, None),
    ],
    ids=lambda x: str(x).replace(" ", "_"),
)
def test_peak_flops_by_device_name(name, dtype, peak):
    assert peak_flops_by_name(name, dtype) == peak


def test_mfu_is_model_flops_over_the_peak_of_all_devices():
    assert mfu(6e9, 1e5, 4, 1e15) == pytest.approx(6e9 * 1e5 / 4e15)
