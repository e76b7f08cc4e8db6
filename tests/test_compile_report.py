"""The ahead-of-time compile report (`lsts.kernels.compile_report`): every Triton launch of lsts, as its
launcher makes it on CUDA, compiles for sm_80 and sm_90; shared memory fits each architecture's block
limit; the attention kernels run on tensor cores (wgmma on sm_90, mma on sm_80), spill nothing at head
dim <= 128, and the plain causal forward needs at most 10 % more registers than the tutorial-style
anchor; nothing else spills registers at head dim <= 128 either — except the launches listed in
`KNOWN_SPILLS`, measured today, whose tests are strict xfails: they turn red the day a kernel stops
spilling, so the list stays exact.

The default suite compiles the representative subset (``--quick``: causal bf16 attention at D = 64
and 128 and one launch of every other kernel); the full sweep (every dtype, head dim and mask
variant) is ``slow``. The report runs in a subprocess: the tests' Triton interpreter
(``TRITON_INTERPRET=1``) would replace the compiled kernels it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lsts.kernels import compile_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_80", "sm_90")
KERNELS = {
    "attn_fwd_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkv_kernel", "ce_chunk_kernel", "rms_norm_fwd_kernel",
    "rms_norm_bwd_kernel", "rope_kernel", "select_kernel", "sparse_fwd_kernel", "sparse_bwd_kernel",
    "grouped_mm_kernel", "grouped_wgrad_kernel", "anchor_fwd_kernel",
}  # fmt: skip
ATTENTION = {"attn_fwd_kernel": "fwd", "attn_bwd_dq_kernel": "dq", "attn_bwd_dkv_kernel": "dkv"}

# (arch, kernel, case, head dim): spill stores / loads measured with triton 3.9, none of them attention's
# (those are gone: `test_attention_fits`). A launch that spills and is not here fails `test_no_unlisted_spills`.
KNOWN_SPILLS = {
    ("sm_80", "rms_norm_bwd_kernel", "dim 8192 bf16", None): "356/356 B",
    ("sm_80", "rms_norm_bwd_kernel", "dim 8192 fp16", None): "344/344 B",
    ("sm_80", "select_kernel", "sparse attention bf16", 128): "12/12 B",
    ("sm_80", "sparse_bwd_kernel", "sparse attention bf16", 64): "7076/7612 B",
    ("sm_80", "sparse_bwd_kernel", "sparse attention bf16", 128): "7168/7608 B",
    ("sm_90", "rms_norm_bwd_kernel", "dim 8192 bf16", None): "324/324 B",
    ("sm_90", "rms_norm_bwd_kernel", "dim 8192 fp16", None): "324/324 B",
    ("sm_90", "select_kernel", "sparse attention bf16", 128): "120/136 B",
    ("sm_90", "sparse_bwd_kernel", "sparse attention bf16", 64): "1460/1444 B",
    ("sm_90", "sparse_bwd_kernel", "sparse attention bf16", 128): "1740/1736 B",
}


def _run_report(quick: bool) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])  # this tree's lsts
    cmd = [sys.executable, "-m", "lsts.kernels.compile_report", "--json", *(["--quick"] if quick else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode in (0, 1), proc.stderr  # 1: some launch failed to compile (the rows say which)
    return json.loads(proc.stdout)


class Report(list):
    """The report's rows; ``quick`` when it is the representative subset."""

    quick = True


@pytest.fixture(scope="module", params=["quick", pytest.param("full", marks=pytest.mark.slow)])
def rows(request) -> Report:
    report = Report(_run_report(quick=request.param == "quick"))
    report.quick = request.param == "quick"
    return report


def _spills(row: dict) -> bool:
    return row["spill_store_bytes"] + row["spill_load_bytes"] > 0


def test_every_launch_compiles_for_both_archs(rows):
    failed = [(r["arch"], r["family"], r["case"], r["error"]) for r in rows if r["error"]]
    assert not failed
    # The same launches, compiled for each; the attention kernels' tiles depend on the architecture.
    launches = {
        arch: {
            (r["kernel"], r["case"], r["head_dim"], "" if r["kernel"] in ATTENTION else r["tiles"])
            for r in rows
            if r["arch"] == arch
        }
        for arch in ARCHS
    }
    assert launches["sm_80"] == launches["sm_90"]
    assert {kernel for kernel, *_ in launches["sm_90"]} == KERNELS


def test_launches_are_the_launchers_own(rows):
    """The report compiled what the launchers chose on CUDA: each attention kernel's tiles, warps and
    stages from the launcher's table for its head dim and architecture (16-row tiles are the
    interpreter's), the vocabulary block of 4096 with 8 warps."""
    from lsts.kernels.attention import triton as attention_kernels

    for r in rows:
        if r["kernel"] in ATTENTION:
            d = r["head_dim"]
            size = 4 if r["case"].endswith("fp32") else 2
            key = (ATTENTION[r["kernel"]], d, size, compile_report.ARCHS[r["arch"]])
            block_m, block_n, warps, stages = attention_kernels._CUDA_TILES[key]
            assert (r["tiles"], r["num_warps"], r["num_stages"]) == (f"M={block_m} N={block_n} D={d}", warps, stages), r
        if r["kernel"] == "ce_chunk_kernel":
            assert (r["tiles"], r["num_warps"]) == ("V=4096", 8), r


def test_attention_fits(rows):
    """Every attention launch (every mask variant, dtype and head dim) fits its architecture's shared
    memory, and none spills at head dim <= 128 (at 64×64 tiles and 4 warps everywhere, dK/dV spilled on
    both architectures and dQ on sm_80, and D = 256 overflowed shared memory)."""
    attention = [r for r in rows if r["kernel"] in ATTENTION]
    assert attention
    assert [r for r in attention if r["shared_bytes"] > r["shared_limit"]] == []
    assert [r for r in attention if _spills(r) and r["head_dim"] <= 128] == []


def test_plain_causal_forward_costs_what_the_anchor_does(rows):
    """The plain causal forward needs at most 10 % more registers than the tutorial-style anchor
    (`compile_anchor`: the same tiles, none of the span / document / sink / softcap machinery)."""
    anchors = {(r["arch"], r["head_dim"]): r for r in rows if r["kernel"] == "anchor_fwd_kernel"}
    plain = [r for r in rows if r["kernel"] == "attn_fwd_kernel" and r["case"] == "causal bf16"]
    compared = [(r, anchors[r["arch"], r["head_dim"]]) for r in plain if (r["arch"], r["head_dim"]) in anchors]
    assert len(compared) == len(anchors) == (2 if rows.quick else 4)  # D = 128 (and 64), both architectures
    for r, anchor in compared:
        assert r["tiles"].startswith(anchor["tiles"]) and r["num_warps"] == anchor["num_warps"], (r, anchor)
        assert r["registers"] <= 1.1 * anchor["registers"], (r, anchor)
        assert not _spills(anchor)


def test_shared_memory_within_each_arch_limit(rows):
    assert [r for r in rows if r["shared_bytes"] > r["shared_limit"]] == []
    assert {r["shared_limit"] for r in rows if r["arch"] == "sm_80"} == {163 * 1024}
    assert {r["shared_limit"] for r in rows if r["arch"] == "sm_90"} == {227 * 1024}


def test_attention_runs_on_tensor_cores(rows):
    wanted = {"sm_90": "HGMMA", "sm_80": "HMMA"}  # wgmma on Hopper, mma.sync on Ampere
    for r in rows:
        if r["kernel"] in ATTENTION:  # fp32 dK/dV on sm_90 uses 32-key tiles, too few rows for wgmma
            assert r["tensor_core_ops"] > 0 and (r["tensor_core_op"] == wanted[r["arch"]] or "fp32" in r["case"]), r
        if r["kernel"].startswith("grouped_"):  # on sm_90 the weight gradient gets mma.sync, not wgmma (yet)
            assert r["tensor_core_ops"] > 0, r


def test_no_unlisted_spills(rows):
    """Nothing spills at head dim <= 128 (kernels without a head dim included) beyond `KNOWN_SPILLS`."""
    spilling = [r for r in rows if _spills(r) and (r["head_dim"] or 0) <= 128]
    unlisted = [
        (r["arch"], r["kernel"], r["case"], r["head_dim"], f"{r['spill_store_bytes']}/{r['spill_load_bytes']} B")
        for r in spilling
    ]
    assert [u for u in unlisted if u[:4] not in KNOWN_SPILLS] == []


def _find(rows: Report, match) -> list[dict]:
    found = [r for r in rows if match(r)]
    if not found:
        if rows.quick:
            pytest.skip("not in the quick subset")
        raise LookupError("the full report has no such launch: update the list")  # not the xfail's AssertionError
    return found


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(k, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=v))
        for k, v in KNOWN_SPILLS.items()
    ],
    ids=lambda k: "-".join(map(str, k)),
)
def test_known_spill_is_gone(rows, key):
    arch, kernel, case, head_dim = key
    match = lambda r: (r["arch"], r["kernel"], r["case"], r["head_dim"]) == key  # noqa: E731
    (row,) = _find(rows, match)
    assert not _spills(row), f"{arch} {kernel} {case} D={head_dim} still spills"


def test_needs_compiled_kernels():
    # The tests run Triton's interpreter, under which there is nothing to compile: a clear error.
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with pytest.raises(ValueError, match="without TRITON_INTERPRET"):
        compile_report.report(["sm_90"])


def test_spill_widths():
    assert [compile_report._access_bytes(s) for s in ("", ".64", ".128", ".U8", ".S16")] == [4, 8, 16, 1, 2]
