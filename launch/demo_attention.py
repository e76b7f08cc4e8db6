"""Distributed-attention demo: run every sequence-parallel attention on this torchrun group, check
it against single-process attention on the whole sequence, and time it.

    torchrun --nproc-per-node 2 launch/demo_attention.py [--seq-len 8192] [--heads 8] [--head-dim 64]

A check of the attention layer alone (the quick start trains with launch/train.py). Runs on gloo
(CPU) or nccl (CUDA).
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args() -> argparse.Namespace:
    formatter = type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    p.add_argument("--seq-len", type=int, default=8192, help="global sequence length (multiple of 2 x ranks)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads (a multiple of the ranks, for ulysses)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def run(name: str, fn, layout: str, full: list, want: list) -> None:
    """Time one method forward + backward on this rank's shards and report parity on rank 0."""
    import torch
    import torch.distributed as dist

    from lsts.kernels.attention import CAUSAL
    from lsts.parallel import gather_sequence, shard_sequence

    q, k, v, dout = (shard_sequence(x, layout=layout) for x in full)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dist.barrier()
    start = time.perf_counter()
    out = fn(q, k, v, span=CAUSAL, layout=layout)
    out.backward(dout)
    seconds = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    got = [gather_sequence(x.detach(), layout=layout) for x in (out, q.grad, k.grad, v.grad)]
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
    if dist.get_rank() == 0:
        print(f"{name:<22} {layout:<11} {seconds.item():8.3f} s   max rel err vs 1 process {err:.1e}", flush=True)


def main() -> None:
    args = parse_args()  # --help ends here, before torch is imported
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lsts.kernels.attention import attention
    from lsts.parallel import hybrid_attention, init_process_group, ring_attention, rsa_attention, ulysses_attention

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_process_group()
    try:
        world = dist.get_world_size()
        g = torch.Generator().manual_seed(args.seed)
        shape_q = (args.batch, args.seq_len, args.heads, args.head_dim)
        shape_kv = (args.batch, args.seq_len, args.kv_heads, args.head_dim)
        full = [torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv, shape_q)]
        q, k, v = (x.clone().requires_grad_() for x in full[:3])
        start = time.perf_counter()
        out, _ = attention(q, k, v, causal=True)
        out.backward(full[3])
        single = time.perf_counter() - start
        want = [out.detach(), q.grad, k.grad, v.grad]
        if dist.get_rank() == 0:
            print(
                f"{world} ranks, causal, B={args.batch} N={args.seq_len} "
                f"H={args.heads} H_kv={args.kv_heads} D={args.head_dim}"
            )
            print(f"{'one process (reference)':<34} {single:8.3f} s")
        for layout in ("zigzag", "contiguous", "stripe"):
            run("ring", ring_attention, layout, full, want)
        run("ulysses", ulysses_attention, "zigzag", full, want)
        if world % 2 == 0:  # ulysses pairs inside, ring across the pairs
            mesh = init_device_mesh("cpu" if dist.get_backend() == "gloo" else "cuda", (world // 2, 2))
            run(f"hybrid {world // 2}x2", lambda *a, **kw: hybrid_attention(*a, mesh=mesh, **kw), "zigzag", full, want)
        run("rsa (two rings)", lambda *a, layout, **kw: rsa_attention(*a, **kw), "contiguous", full, want)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
