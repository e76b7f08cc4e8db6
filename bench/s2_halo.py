"""LongLoRA S² and SinkLoRA SF layers under context parallelism: bytes each rank sends with the halo
exchange against the full ring.

    python bench/s2_halo.py                          # N 8192 and 65536 on 2 ranks, 65536 on 4
    python bench/s2_halo.py --seq-lens 8192 --nproc 2

One attention forward + backward of an S² layer (group G = N/4) and an SF layer (G = N/4, 4 sinks)
on gloo ranks in fresh processes, zigzag layout, shapes of the tiny HF test model (4 query heads,
2 K/V heads of dim 16, fp32, batch 1). Every element that leaves a rank is counted, once with the
halo exchange (`lsts.parallel.halo`) and once forced round the ring (``ring.halo_applies``
patched to False, as ``bench/masformer.py`` does). Both paths hand the attention kernel the same
(query, key) pairs; only the traffic differs, so no time is reported.

With G = N/4 the groups are aligned with the runs (N/(2P) tokens) for P <= 4: only the shifted
half-groups that straddle ranks move (G/2 tokens of K and V per neighbour message), and rank 0
sends the 4 sinks once to each other rank. The ring moves P - 1 full K/V shards forward and
2P - 1 K/V-sized messages backward (the blocks and their gradient accumulators).
"""

from __future__ import annotations

import argparse

from _common import count_sent_bytes, markdown_table, run_group

LAYERS = {"S²": ("s2", 0), "SF": ("sf", 4)}


def layer_bytes(rank: int, world: int, seq_len: int, layer: str, force_ring: bool) -> int:
    """Bytes this rank sends for one attention forward + backward of ``layer``."""
    import torch

    from lsts.kernels.attention import Span
    from lsts.parallel import ring_attention, shard_sequence

    sent = count_sent_bytes(force_ring)
    kind, n_sink = LAYERS[layer]
    span = Span(kind, seq_len // 4, n_sink)
    gen = torch.Generator().manual_seed(0)
    q = shard_sequence(torch.randn(1, seq_len, 4, 16, generator=gen)).requires_grad_()
    k, v = (shard_sequence(torch.randn(1, seq_len, 2, 16, generator=gen)).requires_grad_() for _ in range(2))
    ring_attention(q, k, v, span=span, backend="torch").sum().backward()
    return sent[0]


def measure(seq_len: int, nproc: int, layer: str, threads: int) -> dict[str, list[int]]:
    """Per mode: bytes sent by each rank."""
    got = {}
    for mode in ("halo", "ring"):
        out = run_group(layer_bytes, nproc, (seq_len, layer, mode == "ring"), threads=threads)
        if not out.ok:
            raise SystemExit(f"{layer} N={seq_len} P={nproc} {mode}: {out.status}: {out.detail}")
        got[mode] = out.results
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 65536], help="global sequence lengths")
    p.add_argument("--nproc", type=int, default=2, help="ranks (context-parallel ring degree)")
    p.add_argument(
        "--extra-nproc", type=int, nargs="*", default=[4], help="further rank counts, run at the longest length only"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()

    configs = [(n, args.nproc) for n in args.seq_lens] + [(max(args.seq_lens), w) for w in args.extra_nproc]
    print("S² / SF attention layer fwd+bwd, G = N/4 (SF: 4 sinks), 4 heads, 2 K/V heads, dim 16, fp32, zigzag\n")
    rows, ratios = [], []
    for n, world in configs:
        for layer in LAYERS:
            got = measure(n, world, layer, args.threads)
            halo, ring = got["halo"], got["ring"]
            ratio = sum(halo) / sum(ring)
            ratios.append(ratio)
            rows.append(
                [
                    layer, n, world, f"{max(halo) / 2**20:.3f}", f"{max(ring) / 2**20:.3f}",
                    f"{sum(halo) / 2**20:.3f}", f"{sum(ring) / 2**20:.3f}", f"{ratio:.4f}",
                ]
            )  # fmt: skip
            print(f"[{layer} N={n} P={world}] {rows[-1][3:]}", flush=True)
    headers = [
        "layer", "N", "ranks", "halo MiB (max rank)", "ring MiB (max rank)", "halo MiB (all ranks)",
        "ring MiB (all ranks)", "halo / ring",
    ]  # fmt: skip
    print()
    print(markdown_table(headers, rows))
    print(f"\nhalo / ring bytes: {min(ratios):.4f} .. {max(ratios):.4f} over the rows above")


if __name__ == "__main__":
    main()
