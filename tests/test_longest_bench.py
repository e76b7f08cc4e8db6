"""The mechanics of ``bench/longest.py``: the RSS watchdog aborts a rank over its budget with a clear
error and lets one within it finish, and the doubling + bisection search finds the boundary of a
fake step function to the granularity."""

import importlib
import json
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_module(name: str):
    """A script of bench/ imported as a module; bench/ leaves sys.path again, so that its script
    names cannot shadow an installed module for the rest of the test session."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


_rss_guard = _bench_module("_rss_guard")
_attention = _bench_module("attention")
Probe, search_max_seq = _attention.Probe, _attention.search_max_seq

GUARD = os.path.join(ROOT, "bench", "_rss_guard.py")
# Touches every page of 256 MiB, then idles long enough for the watchdog (period 20 ms) to see it.
ALLOCATE = "import time\nbuf = bytearray(256 * 2**20)\nbuf[::4096] = b'x' * len(buf[::4096])\ntime.sleep(1.0)\n"


def _run_guarded(tmp_path, budget_gib: float):
    script = tmp_path / "allocate.py"
    script.write_text(ALLOCATE)
    report = tmp_path / "report"
    cmd = [sys.executable, GUARD, f"--budget-gib={budget_gib}", f"--report={report}", "--", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "RANK": "3"})
    return done, json.loads((report / "rank3.json").read_text())


def test_watchdog_aborts_a_rank_over_budget(tmp_path):
    done, report = _run_guarded(tmp_path, budget_gib=0.15)
    assert done.returncode == _rss_guard.EXIT_OVER_BUDGET, done.stderr
    assert "rank 3: peak RSS" in done.stderr and "over the budget of 0.15 GiB" in done.stderr
    assert report["over_budget"] and report["peak_gib"] > 0.15


def test_watchdog_lets_a_rank_within_budget_finish(tmp_path):
    done, report = _run_guarded(tmp_path, budget_gib=2.0)
    assert done.returncode == 0, done.stderr
    # The peak covers the 256 MiB buffer: the report is the process's high-water mark, not a late sample.
    assert not report["over_budget"] and 0.25 < report["peak_gib"] < 2.0


def test_watchdog_in_process_calls_exit_once_over_budget(tmp_path):
    codes, called = [], threading.Event()

    def fake_exit(code):
        codes.append(code)
        called.set()

    budget = _rss_guard.peak_rss_kib() / _rss_guard.KIB_PER_GIB / 2  # already passed
    _rss_guard.start_watchdog(budget, tmp_path, rank=0, exit=fake_exit)
    assert called.wait(10)
    assert codes == [_rss_guard.EXIT_OVER_BUDGET]
    assert json.loads((tmp_path / "rank0.json").read_text())["over_budget"]


def test_search_brackets_the_longest_fitting_length():
    limit, step = 13000, 1024  # a fake step: fits up to 13000 tokens

    def run(n):
        calls.append(n)
        return Probe(n, n <= limit, None, 0.0, None)

    for start in (1024, 4096, 65536):  # from below and from above
        calls = []
        s = search_max_seq(run, start, step, 0.0, float("inf"))
        assert s.best == limit // step * step and s.first_fail == s.best + step, (start, calls)
        assert all(n % step == 0 for n in calls)
        assert len(calls) == len(set(calls)) <= 10  # doubling + bisection, no probe twice
