"""Peak memory of linear + cross-entropy forward + backward on CPU, float32: the chunked torch path of
`lsts.kernels.loss.linear_cross_entropy` against dense ``F.cross_entropy(h @ W.T)``.

Each measurement runs in a fresh process (one contender, one token count): inputs are built, the
peak resident set is restarted (``/proc/self/clear_refs``), then one forward + backward runs and the
peak increase over that baseline is reported. It includes the gradients of ``hidden`` and
``weight`` (``N × d`` and ``V × d``), which both contenders allocate.

Dense holds about three ``N × V`` float32 tensors at its peak (the log-softmax it saves, the
gradient arriving at it and the logits gradient it produces): about 47 GiB at 131072 tokens × 32000
vocabulary, more than this 24 GiB machine has. So dense is measured at smaller token counts and its
131072-token figure is a linear fit through those points, labelled as such; the chunked path is
measured at 131072 itself.

    python bench/kernels_loss.py                         # ~3 min on 2 cores
    python bench/kernels_loss.py --tokens 32768 --dense-tokens 2048 4096
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as common  # first: puts the repository root on sys.path
import torch
import torch.nn.functional as F

from lsts.kernels.loss import linear_cross_entropy

HEADERS = ["contender", "tokens", "vocab", "d", "peak extra GiB", "vs dense", "fwd+bwd s", "loss/token", "source"]
SEED = 0


def _fwd_bwd(rank: int, world: int, contender: str, n: int, vocab: int, d: int, chunk_size: int) -> dict:
    """One forward + backward in this (fresh) process: peak RSS increase (KiB), seconds, mean loss."""
    g = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * d**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    common.reset_peak_rss()
    baseline = common.peak_rss_kib()
    start = time.perf_counter()
    if contender == "chunked":
        loss, _ = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size, backend="torch")
    else:
        loss = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    loss.backward()
    seconds = time.perf_counter() - start
    return {"extra_kib": common.peak_rss_kib() - baseline, "seconds": seconds, "loss_per_token": loss.item() / n}


def _measure(contender: str, n: int, vocab: int, d: int, chunk_size: int, threads: int, cap_gib: float) -> dict:
    outcome = common.run_group(
        _fwd_bwd,
        world=1,
        args=(contender, n, vocab, d, chunk_size),
        threads=threads,
        distributed=False,
        rss_cap_kib=int(cap_gib * common.KIB_PER_GIB),
    )
    if not outcome.ok:
        raise RuntimeError(f"{contender} at {n} tokens: {outcome.status}: {outcome.detail}")
    print(f"  {contender:8s} N={n:<7d} done in {outcome.results[0]['seconds']:.1f} s", file=sys.stderr)
    return outcome.results[0]


def _linear_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x`` through ``(x, y)`` points (at least two)."""
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def bench_chunked_ce(
    n_tokens: int = 131072,
    vocab: int = 32000,
    d: int = 256,
    chunk_size: int = 4096,
    dense_tokens: tuple[int, ...] = (4096, 8192, 16384),
    threads: int = 2,
    cap_gib: float = 12.0,
) -> list[list]:
    """Rows of ``HEADERS``: dense measured at ``dense_tokens`` and extrapolated linearly to
    ``n_tokens``; chunked measured at ``dense_tokens`` and at ``n_tokens``. "vs dense" is the
    chunked peak over dense's at the same token count (measured, or the fit at ``n_tokens``)."""
    if len(dense_tokens) < 2 or max(dense_tokens) >= n_tokens:
        raise ValueError(f"dense_tokens must be >= 2 counts below n_tokens={n_tokens}, got {dense_tokens}")
    dense, rows = {}, []
    for n in dense_tokens:
        r = _measure("dense", n, vocab, d, chunk_size, threads, cap_gib)
        dense[n] = common.gib(r["extra_kib"])
        rows.append(["dense", n, vocab, d, f"{dense[n]:.2f}", "1", f"{r['seconds']:.1f}", f"{r['loss_per_token']:.4f}",
                     "measured"])  # fmt: skip
    a, b = _linear_fit(list(dense.items()))
    dense[n_tokens] = a + b * n_tokens
    rows.append(["dense", n_tokens, vocab, d, f"{dense[n_tokens]:.2f}", "1", "-", "-",
                 f"extrapolated: linear fit of the {len(dense_tokens)} measured rows"])  # fmt: skip
    for n in (*dense_tokens, n_tokens):
        r = _measure("chunked", n, vocab, d, chunk_size, threads, cap_gib)
        extra = common.gib(r["extra_kib"])
        rows.append(["chunked", n, vocab, d, f"{extra:.2f}", f"1/{dense[n] / extra:.0f}", f"{r['seconds']:.1f}",
                     f"{r['loss_per_token']:.4f}", f"measured, chunk_size={chunk_size}"])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--dense-tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cap-gib", type=float, default=12.0, help="kill a measurement whose RSS passes this")
    args = p.parse_args(argv)
    rows = bench_chunked_ce(
        args.tokens, args.vocab, args.d, args.chunk_size, tuple(args.dense_tokens), args.threads, args.cap_gib
    )
    print(common.markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()
