"""SPT benchmark on CPU: one decoder layer, dense vs LoRA vs SPT, and its two parts (FFN, attention),
time of forward + backward and peak memory, at several token counts. Markdown tables go to stdout,
progress to stderr.

Every measurement runs in a fresh process (`_common.run_group`); its peak resident set is restarted
once the model and inputs exist, so "peak MiB" is what forward + backward add on top of them.
Times are the median of ``--iters`` timed runs after ``--warmup`` untimed ones.

**layer**: a one-layer Llama (hidden ``--hidden``, ``--heads`` heads of 128, SwiGLU ``--ffn``, a
256-token vocabulary so the head costs nothing), one sequence of N tokens, loss + backward:
``dense`` (every weight trainable, lsts fused flash attention), ``lora`` (rank 16 on q/k/v/o/gate/up/
down, frozen base, flash attention), ``spt`` (`lsts.finetune.spt` in its sparse stage: LoRA rank 16,
routed FFN top-2 of 4, sparse MHA with L = N/8, codebook loss).

**ffn**: the SwiGLU FFN alone (weights and input trainable): dense against routed top-2 of 4 (the
torch CPU twin, router included). Target: routed >= 1.6x faster.

**attention**: causal attention alone (q, k, v trainable, ``--heads`` heads of 128): materialized
(the reference backend: the [H, N, N] scores exist), the fused flash kernel, and SPT's sparse MHA
(product-quantizer codes, exact top-L selection, sparse attention). Target: sparse peak <= 1/4 of
materialized at 8192.

    python bench/spt.py                      # ~5-8 min on 2 shared cores
    python bench/spt.py --tokens 2048 --iters 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _common as common  # first: puts the repository root on sys.path
import torch
import torch.nn.functional as F

SEED = 0


def _time(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _measure(build, warmup: int, iters: int) -> tuple[float, float]:
    """``build()`` returns a step closure; -> (ms, peak MiB added by the steps)."""
    step = build()
    base = common.current_rss_kib(os.getpid()) if common.reset_peak_rss() else common.peak_rss_kib()
    ms = _time(step, warmup, iters)
    return ms, (common.peak_rss_kib() - base) / 1024


# ---------------------------------------------------------------------------------------- layer


def _layer_model(hidden: int, heads: int, ffn: int, n: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=hidden // heads, max_position_embeddings=n,
    )  # fmt: skip
    torch.manual_seed(SEED)
    return LlamaForCausalLM(cfg)


def _build_layer(kind: str, hidden: int, heads: int, ffn: int, n: int):
    from peft import LoraConfig, get_peft_model

    from lsts.attention import AttentionContext
    from lsts.finetune.spt import SPTConfig, aux_loss, prepare_spt, set_stage
    from lsts.models.hf import use_lsts_attention

    model, ctx = _layer_model(hidden, heads, ffn, n), AttentionContext(backend="torch")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if kind == "dense":
        use_lsts_attention(model, ctx=ctx)
    elif kind == "lora":
        use_lsts_attention(model, ctx=ctx)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    else:
        model = prepare_spt(model, SPTConfig(backend="torch"), ctx)
    model.train()
    tokens = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(SEED))
    if kind == "spt":  # the dense stage trains the codebooks first; measure the sparse stage
        model(tokens[:, : min(n, 512)], labels=tokens[:, : min(n, 512)])
        set_stage(model, "sparse")

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, labels=tokens).loss
        if kind == "spt":
            loss = loss + aux_loss(model)
        loss.backward()

    return step


# ------------------------------------------------------------------------------------------ FFN


def _build_ffn(kind: str, hidden: int, ffn: int, n: int):
    from lsts.kernels.spt import routed_ffn

    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(n, hidden, generator=g, requires_grad=True)
    w_gate, w_up = (torch.randn(ffn, hidden, generator=g).mul_(hidden**-0.5).requires_grad_() for _ in range(2))
    w_down = torch.randn(hidden, ffn, generator=g).mul_(ffn**-0.5).requires_grad_()
    router = torch.randn(4, hidden, generator=g).mul_(hidden**-0.5).requires_grad_()
    params = [x, w_gate, w_up, w_down, router]

    def step():
        for p in params:
            p.grad = None
        if kind == "dense":
            out = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
        else:
            out = routed_ffn(x, x @ router.T, w_up, w_down, F.silu, w_gate=w_gate, backend="torch")
        out.sum().backward()

    return step


# ------------------------------------------------------------------------------------ attention


def _build_attention(kind: str, heads: int, n: int):
    from lsts.kernels.attention import attention
    from lsts.kernels.spt import ProductQuantizer, budget_for, select_keys, sparse_attention

    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(1, n, heads, 128, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, n, heads, 128, generator=g)
    pq = ProductQuantizer(128)
    pq.initialize(torch.cat([q.detach()[0, :512].reshape(-1, 128), k.detach()[0, :512].reshape(-1, 128)]))

    def step():
        for t in (q, k, v):
            t.grad = None
        if kind == "sparse":
            idx = select_keys(pq.encode(q), pq.encode(k), budget_for(n), backend="torch")
            out, _ = sparse_attention(q, k, v, idx, backend="torch")
        else:
            out, _ = attention(q, k, v, causal=True, backend="reference" if kind == "materialized" else "torch")
        out.backward(dout)

    return step


# ------------------------------------------------------------------------------------------ run


def _child(rank: int, world: int, section: str, kind: str, args: argparse.Namespace, n: int):
    if section == "layer":
        build = lambda: _build_layer(kind, args.hidden, args.heads, args.ffn, n)  # noqa: E731
    elif section == "ffn":
        build = lambda: _build_ffn(kind, args.hidden, args.ffn, n)  # noqa: E731
    else:
        build = lambda: _build_attention(kind, args.heads, n)  # noqa: E731
    return _measure(build, args.warmup, args.iters)


SECTIONS = {
    "layer": ("dense", "lora", "spt"),
    "ffn": ("dense", "routed"),
    "attention": ("materialized", "flash", "sparse"),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="sequence lengths N")
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the layer")
    p.add_argument("--heads", type=int, default=4, help="attention heads (head dim 128)")
    p.add_argument("--ffn", type=int, default=1536, help="FFN hidden units (SwiGLU; 4 blocks)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement (1: stable on shared cores)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--timeout-s", type=float, default=300.0, help="per measurement")
    args = p.parse_args(argv)
    print(
        f"Machine: {common.mem_total_gib():.0f} GiB, {args.threads} torch thread(s) per measurement, torch "
        f"{torch.__version__}; cores shared with other work, so times are indicative. Layer: hidden {args.hidden}, "
        f"{args.heads} heads x 128, SwiGLU {args.ffn}; fp32, batch 1; fwd+bwd; median of {args.iters} after "
        f"{args.warmup} warm-up; peak = resident set added by the steps.\n"
    )
    for section in args.sections:
        rows, ref = [], {}
        for n in args.tokens:
            for kind in SECTIONS[section]:
                print(f"[spt bench] {section} {kind} N={n}", file=sys.stderr, flush=True)
                out = common.run_group(
                    _child, 1, (section, kind, args, n), threads=args.threads, distributed=False,
                    timeout_s=args.timeout_s,
                )  # fmt: skip
                if not out.ok:
                    rows.append([kind, n, "-", "-", "-", "-", out.status])
                    continue
                ms, mib = out.results[0]
                base_ms, base_mib = ref.setdefault(n, (ms, mib))
                rows.append([kind, n, f"{ms:.0f}", f"{base_ms / ms:.2f}", f"{mib:.0f}", f"{mib / base_mib:.2f}", ""])
        print(f"### {section}\n")
        headers = ["contender", "N", "fwd+bwd ms", f"speedup vs {SECTIONS[section][0]}", "peak MiB",
                   f"memory vs {SECTIONS[section][0]}", "note"]  # fmt: skip
        print(common.markdown_table(headers, rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
