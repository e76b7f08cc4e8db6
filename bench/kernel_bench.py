"""Kernel benchmarks: span attention and chunked linear cross-entropy, on CPU and, where a CUDA
device is present, on GPU. Markdown tables go to stdout (for ``docs/benchmarks.md``), progress to
stderr.

Sections (``--sections``; default: ``window-cpu loss-cpu gpu`` without CUDA, where ``gpu`` only
prints that its figures are pending, and ``gpu`` alone with CUDA, whose lease time is scarce):

**window-cpu**. One forward + backward of `lsts.kernels.attention.attention` (``backend="torch"``,
fp32, one process with ``--threads`` threads) at N = ``--seq-len``: full causal (the fused aten
kernel) against window spans of several w, and the block, S² and SF group spans at one group size
(the blockwise path: chunks of queries against the keys their span reaches). A window should cost
about w/N of causal; the exact ratio of unmasked (query, key) pairs is printed beside it, as is the
ratio of pairs the blockwise path computes (whole query chunks against key ranges, so more than the
unmasked area). Every span is first checked against the float64 reference at a small length. Run
it on otherwise idle cores: the blockwise path makes many small multi-threaded aten calls, which
slow down far more than the one fused causal call when another job shares the cores (measured here:
window rows 10x slower with 2 threads beside a 4-rank job, sane with ``--threads 1``).

**loss-cpu**. Peak memory of linear + cross-entropy forward + backward, fp32: the chunked torch path
of `lsts.kernels.loss.linear_cross_entropy` against dense ``F.cross_entropy(h @ W.T)``, each in a
fresh process, the peak resident set restarted (``/proc/self/clear_refs``) once inputs exist; the
figure includes the ``N × d`` and ``V × d`` gradients both contenders allocate. Dense holds about
three ``N × V`` fp32 tensors at its peak (~47 GiB at 131072 × 32000), so it is measured at smaller
token counts and its figure at ``--loss-tokens`` is a labelled linear fit of those.

**gpu**. bf16, causal, ``[B, N, H, D]``: lsts Triton attention against PyTorch SDPA restricted to
FlashAttention or cuDNN (fed transposed views of the same tensors, so all compute the same thing),
forward and backward TFLOP/s; Triton window spans against Triton causal; chunked (Triton) against
dense cross-entropy, time and peak CUDA memory. Times: ``triton.testing.do_bench`` medians.

    python bench/kernel_bench.py --sections window-cpu                    # ~3-4 min on 2 idle cores
    python bench/kernel_bench.py --sections window-cpu --seq-len 8192 --windows 512 1024 4096 --warmup 1 --iters 3
    python bench/kernel_bench.py --sections loss-cpu                      # ~3 min on 2 cores
    python bench/kernel_bench.py --sections gpu                           # a few minutes on one GPU
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
import time
from collections.abc import Callable

import _common as common  # first: puts the repository root on sys.path
import torch
import torch.nn.functional as F

from lsts.kernels.attention import CAUSAL, Span, attention, cpu
from lsts.kernels.loss import linear_cross_entropy

SECTIONS = ("window-cpu", "loss-cpu", "gpu")
SEED = 0
CHECK_LEN = 509  # odd, and longer than a blockwise chunk, so partial chunks are exercised
CHECK_SIZE = 96  # even (s2 / sf halve it), and several windows / groups fit in CHECK_LEN


def machine_line(threads: int) -> str:
    with open("/proc/cpuinfo") as f:
        cpu_name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    return (
        f"Machine: {cpu_name} ({os.cpu_count()} cores, {common.mem_total_gib():.0f} GiB), {threads} torch threads; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


# ----------------------------------------------------------------------------------- span geometry


def kept_pairs(span: Span, n: int, heads: int) -> float:
    """Unmasked (query, key) pairs of one sequence of ``n`` tokens, averaged over ``heads``: the
    work an ideal kernel does. Causal is ``n(n+1)/2``."""
    i = torch.arange(n, dtype=torch.float64)
    if span.kind == "full":
        return float(n * n)
    if span.window:
        return (i + 1).clamp(max=span.window).sum().item()
    if not span.group:
        return (i + 1).sum().item()
    total = 0.0
    for h in range(heads):
        s = span.shift(h, heads)
        start = ((i + s) // span.group * span.group - s).clamp(min=0)  # first key of query i's group
        total += (i - start + 1 + start.clamp(max=span.n_sink)).sum().item()  # group keys, then sinks before it
    return total / heads


def blockwise_pairs(span: Span, n: int, heads: int, chunk: int) -> float:
    """Pairs the CPU blockwise path computes: each chunk of ``chunk`` queries against the whole key
    range its span reaches (and the sinks before it), averaged over heads."""
    total = 0
    for h in range(heads):
        s = span.shift(h, heads)
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n) - 1
            lo, hi = span.key_range(c0, c1, s)
            total += (c1 - c0 + 1) * (max(hi - lo, 0) + min(span.n_sink, lo))
    return total / heads


def _cpu_chunk() -> int | None:
    """Query chunk of the blockwise CPU path, read from its signature so the estimate follows it."""
    p = inspect.signature(cpu.span_attention_fwd).parameters.get("chunk")
    return p.default if p is not None and isinstance(p.default, int) else None


def span_label(span: Span) -> str:
    return span.kind + (f" (sinks {span.n_sink})" if span.n_sink else "")


# ------------------------------------------------------------------------------------ attention


def attn_inputs(b: int, n: int, h: int, d: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """q, k, v (leaves needing grad) and the output gradient, ``[B, N, H, D]``."""
    g = torch.Generator(device=device).manual_seed(SEED)
    xs = [torch.randn(b, n, h, d, generator=g, device=device, dtype=dtype) for _ in range(4)]
    return [x.requires_grad_() for x in xs[:3]] + [xs[3]]


def check_span(span: Span, backend: str, device: str, dtype: torch.dtype, heads: int, tol: float) -> None:
    """Assert out and every gradient of ``backend`` match the float64 reference at ``CHECK_LEN``
    tokens (relative to the largest reference value), so a timed kernel is a correct one. Sizes are
    capped at ``CHECK_SIZE`` so that window and group edges fall inside the short sequence."""
    span = Span(span.kind, min(span.size, CHECK_SIZE), span.n_sink) if span.size else span
    q, k, v, dout = attn_inputs(1, CHECK_LEN, heads, 64, dtype, device)
    got = _out_and_grads(span, backend, q, k, v, dout)
    want = _out_and_grads(span, "reference", *(x.detach().double().requires_grad_() for x in (q, k, v)), dout.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err <= tol, f"{span} on {backend}: {name} differs from the reference by {err:.2e} (relative)"


def _out_and_grads(span: Span, backend: str, q, k, v, dout) -> tuple[torch.Tensor, ...]:
    out, _ = attention(q, k, v, span=span, backend=backend)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def time_cpu(span: Span, q, k, v, dout, warmup: int, iters: int) -> tuple[float, float]:
    """Seconds per forward and per forward + backward, averaged over ``iters`` after ``warmup``."""
    fwd = total = 0.0
    for it in range(warmup + iters):
        for t in (q, k, v):
            t.grad = None  # no accumulation: every iteration does the same work
        start = time.perf_counter()
        out, _ = attention(q, k, v, span=span, backend="torch")
        mid = time.perf_counter()
        out.backward(dout)
        end = time.perf_counter()
        if it >= warmup:
            fwd, total = fwd + (mid - start) / iters, total + (end - start) / iters
    return fwd, total


def cpu_spans(args: argparse.Namespace) -> list[Span]:
    spans = [CAUSAL]
    for w in args.windows:
        if w >= args.seq_len:
            print(f"[window-cpu] window {w} >= N = {args.seq_len} is causal attention: skipped", file=sys.stderr)
        else:
            spans.append(Span("window", w))
    if args.group_size:
        g = args.group_size
        spans += [Span("block", g), Span("s2", g), Span("sf", g, n_sink=args.n_sink)]
    return spans


def run_window_cpu(args: argparse.Namespace) -> None:
    n, h, chunk = args.seq_len, args.heads, _cpu_chunk()
    spans = cpu_spans(args)
    for span in spans:
        check_span(span, "torch", "cpu", torch.float32, h, tol=1e-4)
    q, k, v, dout = attn_inputs(args.batch, n, h, args.head_dim, torch.float32, "cpu")
    causal_area, rows, causal_s = kept_pairs(CAUSAL, n, h), [], None
    for span in spans:
        fwd, total = time_cpu(span, q, k, v, dout, args.warmup, args.iters)
        print(
            f"[window-cpu] {span_label(span)} {span.size or ''} N={n}: fwd {fwd:.2f} s, fwd+bwd {total:.2f} s",
            file=sys.stderr,
        )
        causal_s = causal_s or total  # causal runs first
        computed = 1.0 if span == CAUSAL else (blockwise_pairs(span, n, h, chunk) / causal_area if chunk else None)
        rows.append([span_label(span), span.size or "-", _fmt(fwd), _fmt(total), _fmt(total / causal_s),
                     _fmt(span.size / n) if span.size else "-", _fmt(kept_pairs(span, n, h) / causal_area),
                     _fmt(computed)])  # fmt: skip
    print(
        f"\n### window-cpu: span attention fwd+bwd on CPU\n\n{machine_line(torch.get_num_threads())}\n\n"
        f'`attention(..., backend="torch")`, fp32, B={args.batch} N={n} H={h} D={args.head_dim}; '
        f"warmup {args.warmup}, iters {args.iters}\n"
    )
    headers = ["span", "size", "fwd (s)", "fwd+bwd (s)", "time / causal", "size / N", "ideal ratio",
               "computed ratio"]  # fmt: skip
    print(common.markdown_table(headers, rows))
    print(
        "\nideal ratio: unmasked (query, key) pairs over causal's N(N+1)/2 (a window sees w keys where causal "
        "sees N/2 on average, so about 2w/N). computed ratio: pairs the blockwise path multiplies "
        f"(chunks of {chunk} queries against the key range the chunk reaches) over causal's; the fused causal "
        "kernel's own tiling is not counted."
    )


# ----------------------------------------------------------------------------- loss (CPU, RSS)

LOSS_HEADERS = ["contender", "tokens", "vocab", "d", "peak extra GiB", "vs dense", "fwd+bwd s", "loss/token", "source"]


def _loss_fwd_bwd(rank: int, world: int, contender: str, n: int, vocab: int, d: int, chunk_size: int) -> dict:
    """One forward + backward in this (fresh) process: peak RSS increase (KiB), seconds, mean loss."""
    g = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * d**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    common.reset_peak_rss()  # the peak then excludes building the inputs
    baseline = common.peak_rss_kib()
    start = time.perf_counter()
    loss = ce_loss(contender, hidden, weight, labels, chunk_size, backend="torch")
    loss.backward()
    seconds = time.perf_counter() - start
    return {"extra_kib": common.peak_rss_kib() - baseline, "seconds": seconds, "loss_per_token": loss.item() / n}


def ce_loss(contender: str, hidden, weight, labels, chunk_size: int, backend: str) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T``: chunked lsts, or dense with fp32 logits (the
    usual upcast of half logits before the softmax; a no-op in fp32)."""
    if contender == "chunked":
        return linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size, backend=backend)[0]
    return F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")


def _loss_measure(contender: str, n: int, args: argparse.Namespace) -> dict:
    outcome = common.run_group(
        _loss_fwd_bwd,
        world=1,
        args=(contender, n, args.vocab, args.loss_dim, args.chunk_size),
        threads=args.threads,
        distributed=False,
        rss_cap_kib=int(args.cap_gib * common.KIB_PER_GIB),
    )
    if not outcome.ok:
        raise RuntimeError(f"{contender} at {n} tokens: {outcome.status}: {outcome.detail}")
    print(f"[loss-cpu] {contender:8s} N={n:<7d} done in {outcome.results[0]['seconds']:.1f} s", file=sys.stderr)
    return outcome.results[0]


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x`` through ``(x, y)`` points (at least two)."""
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def run_loss_cpu(args: argparse.Namespace) -> None:
    """Dense measured at ``--dense-tokens`` and fitted linearly to ``--loss-tokens``; chunked measured
    at all of them. "vs dense" is the chunked peak over dense's at the same token count."""
    n_big, small, v, d = args.loss_tokens, args.dense_tokens, args.vocab, args.loss_dim
    if len(small) < 2 or max(small) >= n_big:
        raise ValueError(f"--dense-tokens needs >= 2 counts below --loss-tokens={n_big}, got {small}")
    dense, rows = {}, []
    for n in small:
        r = _loss_measure("dense", n, args)
        dense[n] = common.gib(r["extra_kib"])
        rows.append(["dense", n, v, d, f"{dense[n]:.2f}", "1", f"{r['seconds']:.1f}", f"{r['loss_per_token']:.4f}",
                     "measured"])  # fmt: skip
    a, b = linear_fit(list(dense.items()))
    dense[n_big] = a + b * n_big
    rows.append(["dense", n_big, v, d, f"{dense[n_big]:.2f}", "1", "-", "-",
                 f"extrapolated: linear fit of the {len(small)} measured rows"])  # fmt: skip
    for n in (*small, n_big):
        r = _loss_measure("chunked", n, args)
        extra = common.gib(r["extra_kib"])
        rows.append(["chunked", n, v, d, f"{extra:.2f}", f"1/{dense[n] / extra:.0f}", f"{r['seconds']:.1f}",
                     f"{r['loss_per_token']:.4f}", f"measured, chunk_size={args.chunk_size}"])  # fmt: skip
    print(
        f"\n### loss-cpu: linear + cross-entropy fwd+bwd peak memory on CPU\n\n{machine_line(args.threads)}\n\n"
        "fp32; peak RSS increase over the inputs, one fresh process per row\n"
    )
    print(common.markdown_table(LOSS_HEADERS, rows))


# ------------------------------------------------------------------------------------------- GPU


def bench_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds per call: ``do_bench`` on CUDA (events, L2 flushed between calls); on CPU
    (only to exercise this section's code) a plain wall-clock loop."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def attention_contenders(q, k, v, backend: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Causal forward callables, each returning ``out [B, N, H, D]``. SDPA takes ``[B, H, N, D]``:
    it gets transposed views of the same leaves (no copy; the layout a model's projections give)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def lsts_fwd() -> torch.Tensor:
        return attention(q, k, v, span=CAUSAL, backend=backend)[0]

    def sdpa(kind):
        def fwd() -> torch.Tensor:
            with sdpa_kernel(kind):  # one backend only: an unsupported shape raises instead of falling back
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True)  # fmt: skip
            return out.transpose(1, 2)

        return fwd

    return {
        f"lsts {backend}": lsts_fwd,
        "SDPA FlashAttention": sdpa(SDPBackend.FLASH_ATTENTION),
        "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
    }


def fwd_bwd_ms(fwd: Callable[[], torch.Tensor], dout: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[float, float]:
    """Milliseconds of the forward (with autograd on, as in training) and of the backward alone
    (replayed on one retained graph)."""
    fwd_ms = bench_ms(fwd)
    out = fwd()
    bwd_ms = bench_ms(lambda: out.backward(dout, retain_graph=True), grad_to_none=leaves)
    return fwd_ms, bwd_ms


def gpu_attention_rows(args: argparse.Namespace, device: str, backend: str) -> list[list]:
    b, n, h, d = args.gpu_batch, args.gpu_seq_len, args.gpu_heads, args.gpu_head_dim
    q, k, v, dout = attn_inputs(b, n, h, d, torch.bfloat16, device)
    fwd_flops = 4 * b * h * d * kept_pairs(CAUSAL, n, h)
    rows, ref = [], None
    for name, fwd in attention_contenders(q, k, v, backend).items():
        try:
            out = fwd().detach()
            fwd_ms, bwd_ms = fwd_bwd_ms(fwd, dout, [q, k, v])
        except RuntimeError as e:  # e.g. cuDNN attention missing from this build
            print(f"[gpu] {name}: {e}", file=sys.stderr)
            rows.append([name, "-", "-", "-", "-", f"unavailable: {str(e).splitlines()[0][:60]}"])
            continue
        ref = out if ref is None else ref  # lsts first: the others are compared with it
        diff = (out.float() - ref.float()).abs().max().item()
        rows.append([name, f"{fwd_flops / fwd_ms / 1e9:.1f}", f"{2.5 * fwd_flops / bwd_ms / 1e9:.1f}",
                     f"{fwd_ms:.3f}", f"{bwd_ms:.3f}", f"{diff:.1e}"])  # fmt: skip
        print(f"[gpu] {name}: fwd {fwd_ms:.3f} ms, bwd {bwd_ms:.3f} ms", file=sys.stderr)
    return rows


def gpu_window_rows(args: argparse.Namespace, device: str, backend: str) -> list[list]:
    b, n, h, d = args.gpu_batch, args.gpu_seq_len, args.gpu_heads, args.gpu_head_dim
    q, k, v, dout = attn_inputs(b, n, h, d, torch.bfloat16, device)
    spans = [CAUSAL] + [Span("window", w) for w in args.gpu_windows if w < n]
    rows, causal_ms = [], None
    for span in spans:
        check_span(span, backend, device, torch.bfloat16, 2, tol=2e-2)
        fwd_ms, bwd_ms = fwd_bwd_ms(lambda s=span: attention(q, k, v, span=s, backend=backend)[0], dout, [q, k, v])
        causal_ms = causal_ms or fwd_ms + bwd_ms  # causal runs first
        ideal = kept_pairs(CAUSAL, n, h) / kept_pairs(span, n, h)
        rows.append([span_label(span), span.size or "-", f"{fwd_ms:.3f}", f"{bwd_ms:.3f}",
                     f"{causal_ms / (fwd_ms + bwd_ms):.2f}", f"{n / span.size:.0f}" if span.size else "-",
                     f"{ideal:.2f}"])  # fmt: skip
    return rows


def gpu_loss_rows(args: argparse.Namespace, device: str, backend: str) -> list[list]:
    rows = []
    for contender in ("dense", "chunked"):
        n, v, d = args.gpu_ce_tokens, args.vocab, args.gpu_ce_dim
        try:
            peak_gib, ms, per_token = _gpu_loss(contender, n, v, d, args.chunk_size, device, backend)
        except torch.OutOfMemoryError:
            rows.append([contender, n, v, d, "out of memory", "-", "-"])
            continue
        finally:
            torch.cuda.empty_cache()
        rows.append([contender, n, v, d, f"{peak_gib:.2f}", f"{ms:.2f}", f"{per_token:.4f}"])
    return rows


def _gpu_loss(contender: str, n: int, vocab: int, d: int, chunk: int, device: str, backend: str):
    """Peak CUDA memory over the inputs (GiB), median ms and mean loss of one forward + backward."""
    g = torch.Generator(device=device).manual_seed(SEED)
    hidden = torch.randn(n, d, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, device=device, dtype=torch.bfloat16) * d**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)

    def step() -> torch.Tensor:
        loss = ce_loss(contender, hidden, weight, labels, chunk, backend)
        loss.backward()
        return loss

    step()  # compiles the kernels outside the measurement
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = bench_ms(step, grad_to_none=[hidden, weight])
    return peak / 1024**3, ms, loss.item() / n


def gpu_machine_line() -> str:
    import triton

    p = torch.cuda.get_device_properties(0)
    return (
        f"Machine: {p.name} ({p.total_memory / 1024**3:.0f} GiB); torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, Triton {triton.__version__}"
    )


def run_gpu(args: argparse.Namespace, device: str = "cuda", backend: str = "triton") -> None:
    if device == "cuda" and not torch.cuda.is_available():
        print("\n### gpu\n\nGPU figures: pending (no CUDA device found on this machine).")
        return
    b, n, h, d = args.gpu_batch, args.gpu_seq_len, args.gpu_heads, args.gpu_head_dim
    shape = f"bf16, B={b} N={n} H={h} D={d}"
    print(f"\n### gpu: attention and cross-entropy\n\n{gpu_machine_line() if device == 'cuda' else device}\n")
    print(
        f"Causal attention, {shape}. FLOPs: forward 4·B·H·D·(unmasked pairs) = 2·2·B·H·N²·D/2 for causal; "
        "backward 2.5 × forward. out diff: max abs difference from the first row's output.\n"
    )
    headers = ["contender", "fwd TFLOP/s", "bwd TFLOP/s", "fwd ms", "bwd ms", "out diff"]
    print(common.markdown_table(headers, gpu_attention_rows(args, device, backend)))
    print(f"\nlsts {backend} window spans against causal, {shape}; ideal speedup: causal over window unmasked pairs\n")
    headers = ["span", "w", "fwd ms", "bwd ms", "speedup fwd+bwd", "N / w", "ideal speedup"]
    print(common.markdown_table(headers, gpu_window_rows(args, device, backend)))
    print(f"\nLinear + cross-entropy fwd+bwd, bf16 inputs, fp32 logits; chunk_size={args.chunk_size}; "
          "peak CUDA memory over the inputs\n")  # fmt: skip
    headers = ["contender", "tokens", "vocab", "d", "peak extra GiB", "fwd+bwd ms", "loss/token"]
    print(common.markdown_table(headers, gpu_loss_rows(args, device, backend)))


# ------------------------------------------------------------------------------------------- CLI


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout in the epilog and shows every default but None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=summary, epilog=details, formatter_class=_HelpFormatter)
    default_sections = "window-cpu loss-cpu gpu without CUDA, gpu alone with it"
    p.add_argument("--sections", nargs="+", choices=SECTIONS, help=f"sections to run; default: {default_sections}")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the CPU sections")
    w = p.add_argument_group("window-cpu")
    w.add_argument("--seq-len", type=int, default=131072, help="tokens N")
    w.add_argument("--batch", type=int, default=1, help="batch B")
    w.add_argument("--heads", type=int, default=2, help="heads H; few: causal at N=131072 takes minutes on 2 cores")
    w.add_argument("--head-dim", type=int, default=64, help="head dim D")
    w.add_argument("--windows", type=int, nargs="+", default=[1024, 4096, 16384], help="window sizes w")
    w.add_argument("--group-size", type=int, default=4096, help="G of the block, s2 and sf rows; 0 skips them")
    w.add_argument("--n-sink", type=int, default=4, help="sink tokens of the sf row (SinkLoRA uses 4)")
    w.add_argument("--warmup", type=int, default=0, help="untimed iterations per span")
    w.add_argument("--iters", type=int, default=1, help="timed iterations per span")
    loss = p.add_argument_group("loss-cpu (--vocab and --chunk-size also apply to the gpu cross-entropy rows)")
    loss.add_argument("--loss-tokens", type=int, default=131072, help="tokens N of the chunked and extrapolated rows")
    loss.add_argument("--vocab", type=int, default=32000, help="vocabulary V")
    loss.add_argument("--loss-dim", type=int, default=256, help="hidden size d")
    loss.add_argument("--chunk-size", type=int, default=4096, help="tokens per chunk of the chunked loss")
    loss.add_argument("--dense-tokens", type=int, nargs="+", default=[4096, 8192, 16384],
                      help="token counts where dense is measured (>= 2, below --loss-tokens)")  # fmt: skip
    loss.add_argument("--cap-gib", type=float, default=12.0, help="kill a measurement whose RSS passes this")
    g = p.add_argument_group("gpu")
    g.add_argument("--gpu-seq-len", type=int, default=16384, help="tokens N of the attention rows")
    g.add_argument("--gpu-batch", type=int, default=1, help="batch B")
    g.add_argument("--gpu-heads", type=int, default=16, help="heads H")
    g.add_argument("--gpu-head-dim", type=int, default=128, help="head dim D")
    g.add_argument("--gpu-windows", type=int, nargs="+", default=[1024, 4096], help="window sizes w (Triton)")
    g.add_argument("--gpu-ce-tokens", type=int, default=131072, help="tokens N of the cross-entropy rows")
    g.add_argument("--gpu-ce-dim", type=int, default=4096, help="hidden size d of the cross-entropy rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sections = args.sections or (["gpu"] if torch.cuda.is_available() else list(SECTIONS))
    torch.set_num_threads(args.threads)
    for name in SECTIONS:  # a fixed order, whatever the order given
        if name in sections:
            {"window-cpu": run_window_cpu, "loss-cpu": run_loss_cpu, "gpu": run_gpu}[name](args)


if __name__ == "__main__":
    main()
