"""A GPU day in one command: every GPU measurement of lsts, written as one markdown report.

Sections, in this order (each one's failure is reported in its place and the next one still runs;
the report is rewritten after every section, so a run cut short keeps what it measured):

1. **tests**: pytest on the tests that run their kernels on CUDA when it is present (`GPU_TESTS`),
   per-file passed / failed / skipped counts and the failing tests' names.
2. **kernels**: causal attention, bf16, D=128, forward and backward TFLOP/s of the lsts Triton kernel
   against PyTorch SDPA restricted to FlashAttention or cuDNN, and flash-attn's ``flash_attn_func``
   when it is installed (``bench/kernel_bench.py`` times them: ``triton.testing.do_bench`` medians).
3. **compile report**: `lsts.kernels.compile_report` for this device's architecture (registers,
   spills, shared memory of every Triton launch) with this machine's Triton and ptxas.
4. **parallel**: ring and Ulysses attention (zigzag) over every visible GPU on NCCL, forward +
   backward, checked against one device's attention on the whole sequence, whose time / world is
   the ideal the efficiency column divides by.
5. **train**: ``configs/llama3-8b-128k-8gpu.yaml`` scaled to the GPUs present (`scaled_train_args`:
   16,384 tokens and 4 layers per GPU, the config's own shape on 8), ``torchrun launch/train.py``
   for a few steps; tokens/s, MFU and peak memory of the last step, from its ``metrics.jsonl``.

``--quick`` (the default) caps the lengths and gives each section a time limit so that the whole run
fits about 8 minutes on one H200; ``--full`` measures 4K to 64K and lets the tests run to the end.
``--dry-run`` runs every section's code on CPU: tiny shapes, gloo ranks, the kernels' CPU twins,
pytest on a few fast tests, the compile report of one kernel family (a default-suite test runs it).

    python bench/gpu.py --out gpu-report.md             # quick: ~8 min on one H200
    python bench/gpu.py --full --out gpu-report.md      # longer lengths, no caps
    python bench/gpu.py --dry-run --out /tmp/dry.md     # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import _common as common  # first: puts the repository root on sys.path
import kernel_bench
import torch

from lsts.kernels.attention import CAUSAL, attention

REPO = str(common.REPO_ROOT)
GPU_TESTS = [  # each runs its kernels on CUDA when present (the interpreter on CPU)
    "tests/test_triton_attention.py",
    "tests/test_varlen_attention.py",
    "tests/test_softcap_sinks.py",
    "tests/test_loss.py",
    "tests/test_norm.py",
    "tests/test_rope.py",
    "tests/test_spt.py",
]
DRY_TESTS = ["tests/test_norm.py", "-k", "bad_input"]  # fast: exercises the run and its parsing
TRAIN_CONFIG = "configs/llama3-8b-128k-8gpu.yaml"
CONFIG_GPUS, CONFIG_LAYERS, CONFIG_SEQ = 8, 32, 131072  # the config's own layout: 8 GPUs, 16K tokens each
OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
Result = tuple[bool, str]  # a section's (no problem, markdown)


@dataclass(frozen=True)
class Plan:
    """What a run measures, from its mode and the devices present (`make_plan`)."""

    mode: str  # quick / full / dry-run
    device: str  # cuda, or cpu for a dry run
    n_devices: int
    dist_backend: str
    kernel_backend: str  # lsts kernels: triton on CUDA, the CPU twins (torch) in a dry run
    dtype: torch.dtype
    seq_lens: list[int]  # kernels section
    heads: int
    head_dim: int
    test_args: list[str]
    compile_args: list[str]
    parallel_local_len: int  # tokens per rank in the parallel section
    parallel_iters: int
    train_args: list[str]
    train_steps: int
    timeouts: dict[str, float | None] = field(default_factory=dict)  # section -> seconds (None: no cap)


def device_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def make_plan(mode: str) -> Plan:
    if mode == "dry-run":
        return Plan(
            mode, "cpu", 2, "gloo", "torch", torch.float32, seq_lens=[256], heads=2, head_dim=16,
            test_args=DRY_TESTS, compile_args=["--arch", "sm_90", "--quick", "--family", "norm"],
            parallel_local_len=64, parallel_iters=1, train_args=scaled_train_args(2, dry_run=True), train_steps=2,
            timeouts={"tests": 120, "compile": 120, "parallel": 120, "train": 180},
        )  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to exercise the code on CPU")
    n, quick = torch.cuda.device_count(), mode == "quick"
    return Plan(
        mode, "cuda", n, "nccl", "triton", torch.bfloat16,
        seq_lens=[4096, 16384, 65536] if quick else [4096, 8192, 16384, 32768, 65536], heads=16, head_dim=128,
        test_args=GPU_TESTS, compile_args=["--arch", device_arch()] + (["--quick"] if quick else []),
        parallel_local_len=8192 if quick else 16384, parallel_iters=3 if quick else 10,
        train_args=scaled_train_args(n, dry_run=False), train_steps=3 if quick else 6,
        timeouts={"tests": 150, "compile": 60, "parallel": 90, "train": 150} if quick else {},
    )  # fmt: skip


def scaled_train_args(n_devices: int, dry_run: bool) -> list[str]:
    """Overrides of `TRAIN_CONFIG` for ``n_devices``: per GPU the config's 16,384 tokens and 4 of its
    layers (so weights, gradients and AdamW state per GPU stay near what they are on 8: only the
    embeddings do not shrink, ~31 GB on one GPU against 16 GB), Ulysses over pairs when the count is
    even and the ring over the rest. A dry run shrinks the model to a toy."""
    uly = 2 if n_devices % 2 == 0 else 1
    layout = [f"--parallel.cp_ulysses={uly}", f"--parallel.cp_ring={n_devices // uly}"]  # dp_shard -1: the rest
    if dry_run:
        toy = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2"]
        toy += ["--model.ffn_dim=64", "--model.vocab_size=256", "--seq-len=128", "--train.device=cpu"]
        toy += ["--train.dtype=float32", "--parallel.backend=gloo", "--kernels.loss_chunk_size=64"]
        return layout + toy
    layers = max(1, CONFIG_LAYERS * n_devices // CONFIG_GPUS)
    return [*layout, f"--model.n_layers={layers}", f"--seq-len={CONFIG_SEQ * n_devices // CONFIG_GPUS}"]


# ------------------------------------------------------------------------------------ subprocesses


def run_command(
    cmd: list[str], timeout_s: float | None, log_path: str, drop_env: tuple[str, ...] = ()
) -> tuple[int | None, str]:
    """Run ``cmd`` in the repository with this tree first on the import path and without the
    variables ``drop_env``, output to ``log_path``; ``(exit code or None on timeout, output)``. On
    timeout its whole process group is killed (torchrun and pytest leave children otherwise)."""
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session started for this command: only its processes
            proc.wait()
            code = None
    with open(log_path) as f:
        return code, f.read()


def _tail(output: str, lines: int = 5) -> str:
    return " / ".join(line.strip() for line in output.strip().splitlines()[-lines:])


# -------------------------------------------------------------------------------------------- tests


def parse_pytest(output: str) -> tuple[Counter, list[str]]:
    """Per-file outcome counts and the failing test ids, from ``pytest -v`` lines (which a killed run
    has written too, unlike its summary)."""
    counts, failed = Counter(), []
    for test_id, outcome in re.findall(rf"^(\S+::\S+) ({'|'.join(OUTCOMES)})", output, flags=re.M):
        counts[(test_id.split("::")[0], outcome)] += 1
        if outcome in ("FAILED", "ERROR", "XPASS"):
            failed.append(test_id)
    return counts, failed


def section_tests(plan: Plan, tmp: str) -> Result:
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *plan.test_args]
    timeout = plan.timeouts.get("tests")
    code, output = run_command(cmd, timeout, os.path.join(tmp, "pytest.log"))
    counts, failed = parse_pytest(output)
    files = sorted({f for f, _ in counts})
    rows = [[f, *(counts[(f, o)] for o in OUTCOMES)] for f in files]
    status = f"timed out after {timeout:.0f} s (counts so far)" if code is None else f"pytest exit code {code}"
    text = f"`{' '.join(cmd[1:])}`: {status}\n\n"
    text += common.markdown_table(["file", *(o.lower() for o in OUTCOMES)], rows) if rows else _tail(output)
    if failed:
        text += "\n\nFailing: " + ", ".join(f"`{t}`" for t in failed[:20]) + (" ..." if len(failed) > 20 else "")
    return code == 0, text


# ------------------------------------------------------------------------------------------ kernels


def flash_attn_contender(q, k, v) -> dict[str, Callable[[], torch.Tensor]]:
    """flash-attn's ``flash_attn_func`` (``[B, N, H, D]`` like lsts) when installed and on CUDA."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return {}
    return {"flash-attn": lambda: flash_attn_func(q, k, v, causal=True)} if q.is_cuda else {}


def section_kernels(plan: Plan, tmp: str) -> Result:
    rows = []
    for n in plan.seq_lens:
        q, k, v, dout = kernel_bench.attn_inputs(1, n, plan.heads, plan.head_dim, plan.dtype, plan.device)
        fwd_flops = 4 * plan.heads * plan.head_dim * n * (n + 1) / 2  # causal: n(n+1)/2 (query, key) pairs
        contenders = {
            **kernel_bench.attention_contenders(q, k, v, plan.kernel_backend),
            **flash_attn_contender(q, k, v),
        }
        ref, sdpa_flash_ms, lsts_row = None, None, None
        for name, fwd in contenders.items():
            try:
                out = fwd().detach()
                fwd_ms, bwd_ms = kernel_bench.fwd_bwd_ms(fwd, dout, [q, k, v])
            except RuntimeError as e:  # a backend missing from this build, or not for this shape
                rows.append([n, name, "-", "-", "-", "-", "-", f"unavailable: {str(e).splitlines()[0][:60]}"])
                continue
            ref = out if ref is None else ref  # lsts runs first: the others are compared with it
            sdpa_flash_ms = fwd_ms if name == "SDPA FlashAttention" else sdpa_flash_ms
            diff = (out.float() - ref.float()).abs().max().item()
            rows.append([n, name, f"{fwd_flops / fwd_ms / 1e9:.1f}", f"{2.5 * fwd_flops / bwd_ms / 1e9:.1f}",
                         f"{fwd_ms:.3f}", f"{bwd_ms:.3f}", f"{diff:.1e}", ""])  # fmt: skip
            lsts_row = (rows[-1], fwd_ms) if lsts_row is None else lsts_row
            print(f"[kernels] N={n} {name}: fwd {fwd_ms:.3f} ms, bwd {bwd_ms:.3f} ms", file=sys.stderr)
        if sdpa_flash_ms and lsts_row:  # the target: lsts forward >= 0.8x SDPA flash's speed at 16K
            lsts_row[0][7] = f"{sdpa_flash_ms / lsts_row[1]:.2f}x SDPA flash fwd speed"
        del q, k, v, dout
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    headers = ["N", "contender", "fwd TFLOP/s", "bwd TFLOP/s", "fwd ms", "bwd ms", "out diff", "note"]
    shape = f"B=1 H={plan.heads} D={plan.head_dim} {str(plan.dtype).removeprefix('torch.')}"
    ok = all(r[2] != "-" for r in rows if r[1].startswith("lsts"))
    return ok, (
        f"Causal attention, {shape}. FLOPs: forward 4·H·D·N(N+1)/2, backward 2.5 × forward; out diff: max |out − "
        f"lsts out|.\n\n" + common.markdown_table(headers, rows)
    )


# ----------------------------------------------------------------------------------- compile report


def section_compile_report(plan: Plan, tmp: str) -> Result:
    out = os.path.join(tmp, "compile_report.md")
    cmd = [sys.executable, "-m", "lsts.kernels.compile_report", *plan.compile_args, "--out", out]
    timeout = plan.timeouts.get("compile")
    # It compiles each launch for the architecture, which Triton's interpreter (set when a CPU test
    # suite runs this script) would refuse.
    code, output = run_command(cmd, timeout, os.path.join(tmp, "compile_report.log"), drop_env=("TRITON_INTERPRET",))
    if code != 0:
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
        return False, f"`{' '.join(cmd[1:])}`: {why}: {_tail(output)}"
    with open(out) as f:
        return True, f"`python -m lsts.kernels.compile_report {' '.join(plan.compile_args)}`\n\n{f.read().strip()}"


# ----------------------------------------------------------------------------------------- parallel


def _synchronized(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_fwd_bwd(fn, q, k, v, dout, iters: int, device: str, barrier) -> tuple[float, torch.Tensor]:
    """Seconds per forward + backward of ``fn`` after one untimed call (Triton compiles there), and its output."""
    out = None
    for i in range(iters + 1):
        if i == 1:
            _synchronized(device)
            barrier()
            start = time.perf_counter()
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(dout)
    _synchronized(device)
    return (time.perf_counter() - start) / iters, out.detach()


def parallel_rank(rank: int, world: int, plan: Plan) -> list[dict]:
    """One rank: every rank builds the whole sequence (seeded alike), times one device's attention
    on it (the ideal's numerator), then ring and Ulysses on its zigzag shard, whose output must be
    that attention's rows."""
    import torch.distributed as dist

    from lsts.parallel import layout_indices, ring_attention, ulysses_attention

    device = f"cuda:{rank}" if plan.device == "cuda" else "cpu"
    heads = plan.heads if plan.heads % world == 0 else world * max(1, plan.heads // world)  # Ulysses splits heads
    n = plan.parallel_local_len * world
    q, k, v, dout = kernel_bench.attn_inputs(1, n, heads, plan.head_dim, plan.dtype, device)
    backend = plan.kernel_backend

    def local(q, k, v):
        return attention(q, k, v, span=CAUSAL, backend=backend)[0]

    ideal_s, full_out = _time_fwd_bwd(local, q, k, v, dout, plan.parallel_iters, plan.device, dist.barrier)
    idx = layout_indices(n, world, rank, "zigzag").to(device)
    shard = [x.detach()[:, idx].clone().requires_grad_() for x in (q, k, v)]
    results = []
    for name, fn in (("ring", ring_attention), ("ulysses", ulysses_attention)):

        def sharded(q, k, v, fn=fn):
            return fn(q, k, v, causal=True, layout="zigzag", backend=backend)

        seconds, out = _time_fwd_bwd(sharded, *shard, dout[:, idx], plan.parallel_iters, plan.device, dist.barrier)
        diff = (out.float() - full_out[:, idx].float()).abs().max().item()
        results.append({"method": name, "seconds": seconds, "ideal_s": ideal_s / world, "diff": diff, "heads": heads})
    return results


def section_parallel(plan: Plan, tmp: str) -> Result:
    world, timeout = plan.n_devices, plan.timeouts.get("parallel")
    outcome = common.run_group(parallel_rank, world, (plan,), timeout_s=timeout, backend=plan.dist_backend)
    if not outcome.ok:
        return False, f"{world} ranks on {plan.dist_backend}: {outcome.status}: {outcome.detail.strip()[-2000:]}"
    rows = []
    for i, method in enumerate(("ring", "ulysses")):
        per_rank = [r[i] for r in outcome.results]
        seconds, ideal = max(r["seconds"] for r in per_rank), max(r["ideal_s"] for r in per_rank)
        diff = max(r["diff"] for r in per_rank)
        rows.append(
            [method, world, f"{seconds * 1e3:.2f}", f"{ideal * 1e3:.2f}", f"{ideal / seconds:.2f}", f"{diff:.1e}"]
        )
    n, heads = plan.parallel_local_len * world, outcome.results[0][0]["heads"]
    return True, (
        f"Causal attention fwd+bwd, zigzag, N={n} ({plan.parallel_local_len} per rank), H={heads} D={plan.head_dim}, "
        f"{str(plan.dtype).removeprefix('torch.')}, {world} ranks on {plan.dist_backend}; ideal: one device's "
        "time on the whole sequence / ranks; out diff: max |out − that device's rows|.\n\n"
        + common.markdown_table(["method", "ranks", "ms (max over ranks)", "ideal ms", "efficiency", "out diff"], rows)
    )


# -------------------------------------------------------------------------------------------- train


def section_train(plan: Plan, tmp: str) -> Result:
    out = os.path.join(tmp, "train")
    args = [TRAIN_CONFIG, *plan.train_args, f"--steps={plan.train_steps}", f"--out={out}", "--checkpoint.every=0"]
    args += ["--metrics.progress_bar=false", "--metrics.tensorboard=false", "--train.log_every=1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.n_devices}"]
    cmd = [*launcher, "launch/train.py", "--config", *args]
    timeout = plan.timeouts.get("train")
    code, output = run_command(cmd, timeout, os.path.join(tmp, "train.log"))
    shown = f"`torchrun --standalone --nproc-per-node={plan.n_devices} launch/train.py --config {' '.join(args)}`"
    metrics_path = os.path.join(out, "metrics.jsonl")
    records = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    if code != 0 or not records:
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
        return False, f"{shown}: {why} after {len(records)} step(s): {_tail(output)}"
    rows = [
        [r["step"], f"{r['loss']:.4f}", f"{r['tokens_per_sec']:.0f}", _pct(r.get("mfu")), _num(r.get("mem_gib"))]
        for r in records
    ]
    note = "Step 1 includes Triton's compilation; later steps are the steady state.\n\n"
    return True, f"{shown}\n\n{note}" + common.markdown_table(["step", "loss", "tokens/s", "MFU", "peak GiB"], rows)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


# ------------------------------------------------------------------------------------------- report

SECTIONS: dict[str, Callable[[Plan, str], Result]] = {
    "tests": section_tests,
    "kernels": section_kernels,
    "compile": section_compile_report,
    "parallel": section_parallel,
    "train": section_train,
}


def machine_line(plan: Plan) -> str:
    import triton

    if plan.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        where = f"{plan.n_devices} × {p.name} ({p.total_memory / 1024**3:.0f} GiB, {device_arch()})"
        where += f", CUDA {torch.version.cuda}"
    else:
        where = "CPU (dry run: tiny shapes, gloo, the kernels' CPU twins)"
    return f"{where}; torch {torch.__version__}, Triton {triton.__version__}"


def main(argv: list[str] | None = None) -> int:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", dest="mode", action="store_const", const="quick", help="capped lengths and times (default)"
    )
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="4K-64K, no time caps")
    mode.add_argument("--dry-run", dest="mode", action="store_const", const="dry-run", help="every path on CPU, tiny")
    p.add_argument("--out", required=True, help="markdown report to write")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="SECTION",
                   help=f"a subset of: {', '.join(repr(s) for s in SECTIONS)}")  # fmt: skip
    args = p.parse_args(argv)
    plan = make_plan(args.mode or "quick")
    parts = [f"# lsts on {plan.device.upper()}: {plan.mode}\n\n{machine_line(plan)}"]
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections:
            start = time.monotonic()
            print(f"[gpu] {name} ...", file=sys.stderr)
            try:
                ok, body = SECTIONS[name](plan, tmp)
            except Exception as e:  # the report records it and the next section still runs
                ok, body = False, f"error: {type(e).__name__}: {e}"
            if not ok:
                failed.append(name)
            parts.append(f"## {name} ({time.monotonic() - start:.0f} s)\n\n{body}")
            with open(args.out, "w") as f:  # after every section: a run cut short keeps what it has
                f.write("\n\n".join(parts) + "\n")
    print(f"[gpu] report: {args.out}" + (f"; sections with problems: {failed}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
