"""Ahead-of-time compile report: what every Triton kernel of lsts costs on a GPU, measured without one.

    python -m lsts.kernels.compile_report --arch sm_90 [--arch sm_80] [--quick] [--json] [--out FILE]

The Triton toolchain compiles for a GPU architecture on any machine: it lowers a kernel to PTX and
runs the ``ptxas`` bundled in the triton wheel (``triton/backends/nvidia/bin/``) to a cubin, whose
``cuobjdump`` gives registers, stack, shared memory and the SASS. The report compiles exactly what
the launchers would launch on CUDA: it calls the real launcher functions (`attention_fwd`,
`rms_norm_bwd`, ...) with fake CUDA tensors (`FakeTensorMode`: shapes, dtypes and strides, no
memory) while a stub Triton driver names the target architecture, and ``JITFunction.run`` compiles
each ``kernel[grid](...)`` instead of launching it. Arguments, constexprs, tile sizes, warps and the
argument specialization (divisibility, constants) are therefore the launchers' own, not a copy.

Next to the attention launches it compiles an anchor (`compile_anchor`): a minimal causal
FlashAttention-2 forward in the structure of the Triton tutorial's, at its tiles, the yardstick of the
registers lsts's plain causal forward may take.

Per launch it reports: registers per thread; the stack frame and the bytes of spill stores and loads
(the ``STL`` / ``LDL`` instructions of the SASS, what ``ptxas -v`` calls spill stores / loads);
shared memory per block (Triton's dynamic allocation plus the cubin's static part), against the
architecture's limit; and the tensor-core instructions of the SASS (``HGMMA``, i.e. wgmma, on sm_90;
``HMMA``, i.e. mma, on sm_80).

The kernels must be compiled ones: run it without ``TRITON_INTERPRET=1`` (the tests run it in a
subprocess for that reason).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import torch

ARCHS = {"sm_80": 80, "sm_90": 90}
# Shared memory one block may use (the opt-in maximum): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_SMS = {80: 108, 90: 132}  # multiprocessors of an A100 / H100 SXM: only grid sizes depend on them
_TENSOR_CORE = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA|IGMMA)\b")
_SPILL = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)\b")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class Case:
    """One configuration a launcher picks on CUDA: ``run`` calls the launcher(s) on fake CUDA tensors."""

    family: str  # attention, loss, norm, rope, spt
    label: str  # what distinguishes it within the family (span, dtype, head dim, ...)
    head_dim: int | None
    run: Callable[[], object]
    quick: bool = False  # in the representative subset the default-suite test compiles


@dataclass
class Launch:
    """One compiled launch of one case on one architecture."""

    arch: str
    family: str
    case: str
    kernel: str
    head_dim: int | None
    tiles: str = ""
    num_warps: int = 0
    num_stages: int = 0
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0
    shared_limit: int = 0
    tensor_core_ops: int = 0
    tensor_core_op: str = ""  # the most frequent one: HGMMA (wgmma) or HMMA (mma)
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes + self.spill_load_bytes > 0


# --- cases: the launchers, called as lsts calls them on CUDA ------------------------------------------


def _cuda(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda")


# Llama-3-8B's attention shape (32 query heads, 8 K/V heads) over a 4K-token block.
_B, _S, _H, _H_KV = 1, 4096, 32, 8
HEAD_DIMS = (64, 128, 256)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _attention(span_kind: str, span_size: int, dtype: torch.dtype, d: int, docs: bool) -> None:
    from lsts.kernels.attention import Documents, Span
    from lsts.kernels.attention import triton as kernels

    span = Span(span_kind, span_size) if span_size else Span(span_kind)
    # Per-position bounds on the device (their values do not matter to the compiler), boundaries on the host.
    bounds = [_cuda(_S, dtype=torch.int32) for _ in range(2)]
    documents = Documents(*bounds, torch.tensor([0, 1000, 2500, _S])) if docs else None
    q, k, v = _cuda(_B, _S, _H, d, dtype=dtype), *(_cuda(_B, _S, _H_KV, d, dtype=dtype) for _ in range(2))
    out, lse = kernels.attention_fwd(q, k, v, d**-0.5, span, docs=documents)
    kernels.attention_bwd(torch.empty_like(out), q, k, v, out, lse, d**-0.5, span, docs=documents)


def _attention_cases() -> list[Case]:
    cases = []
    # The main path (plain causal) in both half dtypes; each mask feature (its constexpr) in bf16.
    variants = [("causal", 0, False, name) for name in _DTYPES]
    variants += [("full", 0, False, "bf16"), ("causal", 0, True, "bf16"), ("window", 1024, False, "bf16")]
    variants += [("sf", 1024, False, "bf16")]  # shifted groups with attention sinks (SinkLoRA)
    variants += [("causal", 0, False, "fp32")]  # the GPU tests' dtype; fp32 goes up to D = 128
    for kind, size, docs, dt in variants:
        for d in HEAD_DIMS if dt != "fp32" else (64, 128):
            label = f"{kind}{' ' + str(size) if size else ''}{' +docs' if docs else ''} {dt}"
            quick = kind == "causal" and not docs and dt == "bf16" and d <= 128
            dtype = _DTYPES.get(dt, torch.float32)
            run = lambda k=kind, s=size, t=dtype, dd=d, doc=docs: _attention(k, s, t, dd, doc)  # noqa: E731
            cases.append(Case("attention", label, d, run, quick))
    for d in (64, 128):  # the yardstick of the plain causal forward's registers (`compile_anchor`)
        cases.append(Case("attention", ANCHOR_CASE, d, lambda dd=d: _anchor(dd), quick=d == 128))
    return cases


ANCHOR_CASE = "tutorial anchor bf16"


def _anchor(d: int) -> None:
    from lsts.kernels import compile_anchor

    q, k, v = (_cuda(_B, _H, _S, d) for _ in range(3))
    compile_anchor.anchor_fwd(q, k, v, d**-0.5)


def _loss(vocab: int, softcap: float | None) -> None:
    from lsts.kernels.loss import IGNORE_INDEX
    from lsts.kernels.loss import triton as loss

    # The logits chunk is float32 whatever the activations' dtype (the accumulation dtype).
    z = _cuda(2048, vocab, dtype=torch.float32)
    loss.ce_chunk(z, _cuda(2048, dtype=torch.int64), IGNORE_INDEX, softcap)


def _norm(dim: int, dtype: torch.dtype) -> None:
    from lsts.kernels.norm import triton as norm

    x, w = _cuda(_B, _S, dim, dtype=dtype), _cuda(dim, dtype=torch.float32)
    _, rstd = norm.rms_norm_fwd(x, w, 1e-5)
    norm.rms_norm_bwd(torch.empty_like(x), x, w, rstd)


def _rope(heads: int, d: int, dtype: torch.dtype) -> None:
    from lsts.kernels.rope import triton as rope

    x = _cuda(_B, _S, heads, d, dtype=dtype)
    positions = _cuda(_B, _S, dtype=torch.int64)
    inv_freq = _cuda(d // 2, dtype=torch.float32)
    rope.rope_rotate(x, positions, inv_freq, sign=1)  # forward
    rope.rope_rotate(x, positions, inv_freq, sign=-1)  # backward


def _spt_attention(d: int, dtype: torch.dtype) -> None:
    from lsts.kernels.spt import triton as spt

    n, budget, n_sub = 4096, 256, d // 8  # SPT's default codebooks: 8-dim sub-spaces
    q_codes, k_codes = _cuda(_B, n, _H, n_sub, dtype=torch.uint8), _cuda(_B, n, _H_KV, n_sub, dtype=torch.uint8)
    idx = spt.select_keys(q_codes, k_codes, budget)
    q, k = _cuda(_B, n, _H, d, dtype=dtype), _cuda(_B, n, _H_KV, d, dtype=dtype)
    out, lse = spt.sparse_attention_fwd(q, k, k, idx, d**-0.5, 10.0)
    spt.sparse_attention_bwd(torch.empty_like(out), q, k, k, out, lse, idx, d**-0.5, 10.0)


def _grouped_gemm(dtype: torch.dtype) -> None:
    from lsts.kernels.spt import triton as spt

    offsets = [0, 1000, 2048, 4096]  # rows routed to each of 3 blocks (host ints, as the router makes them)
    x, w = _cuda(4096, 4096, dtype=dtype), _cuda(3, 4096, 1024, dtype=dtype)
    src = _cuda(4096, dtype=torch.int64)
    y = spt.grouped_mm_fwd(x, w, src, offsets)
    spt.grouped_wgrad(x, src, y, offsets)


def cases() -> list[Case]:
    """Every configuration the launchers pick on CUDA that the report covers."""
    out = _attention_cases()
    for vocab in (32000, 128256):
        for cap in (None, 30.0):
            label = f"vocab {vocab}{' softcap' if cap else ''}"
            out.append(Case("loss", label, None, lambda v=vocab, c=cap: _loss(v, c), vocab == 128256 and cap is None))
    for dt, dtype in _DTYPES.items():
        for dim in (2048, 4096, 8192):  # the model widths of the configs (MASFormer-1.3B, Llama-3-8B) and 70B's
            out.append(
                Case("norm", f"dim {dim} {dt}", None, lambda n=dim, t=dtype: _norm(n, t), dim == 4096 and dt == "bf16")
            )
        for d in HEAD_DIMS:
            out.append(
                Case("rope", f"{_H} heads {dt}", d, lambda dd=d, t=dtype: _rope(_H, dd, t), d == 128 and dt == "bf16")
            )
    for d in (64, 128):
        out.append(Case("spt", "sparse attention bf16", d, lambda dd=d: _spt_attention(dd, torch.bfloat16), d == 128))
    for dt, dtype in _DTYPES.items():
        out.append(Case("spt", f"grouped GEMM {dt}", None, lambda t=dtype: _grouped_gemm(t), dt == "bf16"))
    return out


# --- compiling instead of launching -------------------------------------------------------------------


class _TargetDriver:
    """The part of Triton's driver that compilation asks: the device (one per architecture, so that each
    JITFunction keeps separate caches) and its target. Launching is never reached."""

    def __init__(self, capability: int) -> None:
        self.capability = capability

    def get_current_device(self) -> int:
        return self.capability

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.capability, 32)


class _ContiguousOnFake(torch.overrides.TorchFunctionMode):
    """``Tensor.contiguous`` of a non-contiguous fake CUDA tensor needs a CUDA device guard, which a CPU
    build of PyTorch lacks; ``clone`` to the contiguous format is the same tensor and needs none."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.contiguous and not args[0].is_contiguous():
            return args[0].clone(memory_format=torch.contiguous_format)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _compile_instead_of_launch(capability: int, launches: list) -> Iterator[None]:
    """Within: CUDA tensors are fake, Triton targets ``capability``, and ``kernel[grid](...)`` compiles
    (``warmup=True``: bind, specialize, compile, no launch) and records ``(JITFunction, kernel, kwargs)``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self, kernel, kwargs))
        return kernel

    previous = driver._active  # None unless someone chose a driver: restored as it was
    properties = mock.Mock(multi_processor_count=_SMS.get(capability, 132))
    driver.set_active(_TargetDriver(capability))
    JITFunction.run = compile_only
    try:
        with (
            warnings.catch_warnings(),
            mock.patch.object(torch.cuda, "get_device_properties", return_value=properties),
            FakeTensorMode(allow_non_fake_inputs=True),
            _ContiguousOnFake(),
        ):
            # Triton reads a fake tensor's data pointer (as 0) for its alignment specialization: fresh
            # CUDA allocations are 256-byte aligned, so "aligned" is what a real launch would see.
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            yield
    finally:
        JITFunction.run = original_run
        driver.set_active(previous)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _measure(cubin: bytes) -> dict[str, int]:
    """Registers, stack, static shared memory, spill bytes and tensor-core instructions of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True)
    reg, stack, shared, _local = map(int, _RES_USAGE.search(usage.stdout).groups())
    stores = loads = 0
    for op, suffix in _SPILL.findall(sass.stdout):
        width = _access_bytes(suffix)
        if op == "STL":
            stores += width
        else:
            loads += width
    ops = collections.Counter(_TENSOR_CORE.findall(sass.stdout))
    return {
        "registers": reg,
        "stack_bytes": stack,
        "static_shared": shared,
        "spill_store_bytes": stores,
        "spill_load_bytes": loads,
        "tensor_core_ops": sum(ops.values()),
        "tensor_core_op": ops.most_common(1)[0][0] if ops else "",
    }


def _access_bytes(suffix: str) -> int:
    """Bytes one local load / store moves, from its SASS width suffix (``.64``, ``.128``, ``.U8``...)."""
    for part in suffix.split("."):
        if part in ("64", "128"):
            return int(part) // 8
        if part in ("U8", "S8"):
            return 1
        if part in ("U16", "S16"):
            return 2
    return 4


_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_L", "BLOCK_D", "BLOCK_V", "BLOCK_H", "BLOCK_F", "BLOCK_SUB")


def _row(arch: str, case: Case, fn, kernel, kwargs: dict, distinct: list[str]) -> Launch:
    """``distinct``: the constexprs that tell this launch from the case's other launches of ``fn``."""
    tiles = [f"{n[6:]}={kwargs[n]}" for n in _TILE_NAMES if n in kwargs] + [f"{n}={kwargs[n]}" for n in distinct]
    row = Launch(arch, case.family, case.label, fn.__name__.strip("_"), case.head_dim, " ".join(tiles))
    row.num_warps, row.num_stages = kernel.metadata.num_warps, kernel.metadata.num_stages
    measured = _measure(kernel.asm["cubin"])
    row.shared_bytes = kernel.metadata.shared + measured.pop("static_shared")
    row.shared_limit = SMEM_LIMIT[ARCHS[arch]]
    for name, value in measured.items():
        setattr(row, name, value)
    return row


def compile_case(case: Case, arch: str) -> list[Launch]:
    """Compile every launch of ``case`` for ``arch``; a failure is one row with its error."""
    launches: list = []
    try:
        with _compile_instead_of_launch(ARCHS[arch], launches):
            case.run()
    except Exception as e:  # the report lists a launch that does not compile; the test fails on it
        return [Launch(arch, case.family, case.label, "(launcher)", case.head_dim, error=f"{type(e).__name__}: {e}")]
    unique: dict = {}  # a kernel launched twice with one configuration is one row
    for fn, kernel, kwargs in launches:
        unique.setdefault((fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items()))), (fn, kernel, kwargs))
    rows = []
    for fn, kernel, kwargs in unique.values():
        siblings = [kw for f, _, kw in unique.values() if f is fn]
        flags = [n for n, v in kwargs.items() if n not in _TILE_NAMES and not isinstance(v, torch.Tensor)]
        distinct = [n for n in flags if any(kw.get(n) != kwargs[n] for kw in siblings)]
        rows.append(_row(arch, case, fn, kernel, kwargs, distinct))
    return rows


def check_compiled_kernels() -> None:
    """The report needs compiled kernels; Triton's interpreter replaces them at import time."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise ValueError("the compile report needs compiled Triton kernels: run it without TRITON_INTERPRET=1")


def report(archs: list[str], quick: bool = False, families: list[str] | None = None) -> list[Launch]:
    check_compiled_kernels()
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}; choose from {sorted(ARCHS)}")
    chosen = [c for c in cases() if (c.quick or not quick) and (families is None or c.family in families)]
    return [row for arch in archs for case in chosen for row in compile_case(case, arch)]


def markdown(rows: list[Launch]) -> str:
    columns = ["arch", "kernel", "case", "D", "tiles", "warps", "stages", "regs", "stack B", "spill st/ld B"]
    columns += ["smem KiB (limit)", "tensor-core ops"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.arch} | {r.kernel} | {r.case} | {r.head_dim or ''} | FAILED: {r.error} |" + " |" * 7)
            continue
        smem = f"{r.shared_bytes / 1024:.1f} ({r.shared_limit // 1024})"
        spill = f"**{r.spill_store_bytes}/{r.spill_load_bytes}**" if r.spills else "0/0"
        lines.append(
            f"| {r.arch} | {r.kernel} | {r.case} | {r.head_dim or ''} | {r.tiles} | {r.num_warps} | {r.num_stages} "
            f"| {r.registers} | {r.stack_bytes} | {spill} | {smem} | {r.tensor_core_ops} {r.tensor_core_op} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lsts.kernels.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="repeatable; default: sm_80 and sm_90")
    parser.add_argument("--quick", action="store_true", help="the representative subset the default tests compile")
    parser.add_argument("--family", action="append", choices=["attention", "loss", "norm", "rope", "spt"])
    parser.add_argument("--json", action="store_true", help="JSON rows instead of the markdown table")
    parser.add_argument("--out", help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    try:
        rows = report(args.arch or sorted(ARCHS), args.quick, args.family)
    except ValueError as e:
        sys.exit(f"error: {e}")
    text = json.dumps([dataclasses.asdict(r) for r in rows], indent=1) if args.json else markdown(rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
