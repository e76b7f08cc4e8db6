"""The context-extension study of issue 5: a tiny Llama pretrained at 1K tokens on the offline corpus,
extended to 8K with lora, longlora, sinklora and full fine-tuning for the same budget (steps,
tokens, learning rate), then perplexity by length and passkey retrieval by length for each.

    python bench/finetune_study.py --workdir runs/study            # everything (about 30 min, 2 cores)
    python bench/finetune_study.py --workdir runs/study --make-only --positions 2048   # just a checkpoint

Every stage is a user command (``launch/finetune.py``, ``launch/eval.py``) run under torchrun, so
the study also exercises the launchers end to end. The anchor is the papers' ordering
(full >= sinklora > longlora > lora on perplexity at the target length); the table reports what
this run measures. Improvement = (PI-only - method) / (PI-only - full), as SinkLoRA reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import REPO_ROOT, markdown_table

REUSE = False  # --reuse: keep the models a previous run of the study trained


def make_llama(path: str, positions: int, dim: int, layers: int, seed: int = 0) -> str:
    """A randomly initialised Llama (GQA 4/2 heads, byte vocabulary) saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=dim, intermediate_size=dim * 8 // 3 // 32 * 32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def torchrun(script: str, nproc: int, args: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(REPO_ROOT / "launch" / script),
    ]
    t0 = time.perf_counter()
    subprocess.run([*cmd, *args], check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def finetune(model: str, out: str, method: str, seq_len: int, steps: int, nproc: int, extra: list[str]) -> float:
    if REUSE and os.path.isdir(os.path.join(out, "merged")):
        return float("nan")
    args = [f"--model={model}", f"--method={method}", f"--seq-len={seq_len}", f"--steps={steps}", f"--out={out}"]
    args += ["--metrics.progress_bar=false", "--checkpoint.every=0", *extra]
    return torchrun("finetune.py", nproc, args)


def evaluate(model: str, out: str, lengths: list[int], nproc: int, trials: int, extend_to: int = 0) -> dict:
    args = [f"--model={model}", f"--lengths={','.join(map(str, lengths))}", f"--out={out}"]
    args += [f"--passkey-trials={trials}", "--depths=0.1,0.5,0.9", "--max-windows=4"]
    args += [f"--extend-to={extend_to}"] if extend_to else []
    torchrun("eval.py", nproc, args)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/study")
    p.add_argument("--positions", type=int, default=1024, help="pretraining length = the model's positions")
    p.add_argument("--target", type=int, default=8192, help="extended length")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--extend-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate, the same for every method")
    p.add_argument("--methods", default="lora,longlora,sinklora,full")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--passkey-trials", type=int, default=4)
    p.add_argument("--make-only", action="store_true", help="only write a random checkpoint to --workdir/init")
    p.add_argument("--reuse", action="store_true", help="skip training stages whose merged model exists")
    args = p.parse_args()
    global REUSE
    REUSE = args.reuse
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    init = os.path.join(work, "init")
    if not (args.reuse and os.path.isdir(init)):
        make_llama(init, args.positions, args.dim, args.layers)
    if args.make_only:
        print(f"checkpoint with {args.positions} positions written to {init}")
        return
    lengths = sorted({args.positions, 2 * args.positions, args.target // 2, args.target})

    pre = os.path.join(work, "pretrain")
    pre_args = ["--parallel.cp_ring=1", "--parallel.dp_shard=-1", "--optim.warmup_steps=30", "--optim.lr=2e-3"]
    pre_args += ["--optim.schedule=cosine", "--optim.min_lr=2e-4", "--optim.weight_decay=0.1"]
    t = finetune(init, pre, "full", args.positions, args.pretrain_steps, args.nproc, pre_args)
    print(f"pretrained {args.pretrain_steps} steps at {args.positions} in {t:.0f} s", flush=True)
    base = os.path.join(pre, "merged")

    rows, results = [], {}
    results["base, no interpolation"] = evaluate(
        base, os.path.join(work, "eval-base.json"), lengths, args.nproc, args.passkey_trials
    )
    results["base + PI, not tuned"] = evaluate(
        base, os.path.join(work, "eval-pi.json"), lengths, args.nproc, args.passkey_trials, extend_to=args.target
    )
    ft_args = [f"--optim.lr={args.lr}", "--optim.warmup_steps=5", "--optim.schedule=constant"]
    times = {}
    for method in args.methods.split(","):
        out = os.path.join(work, method)
        times[method] = finetune(base, out, method, args.target, args.extend_steps, args.nproc, ft_args)
        print(f"{method}: {args.extend_steps} steps at {args.target} in {times[method]:.0f} s", flush=True)
        results[method] = evaluate(
            os.path.join(out, "merged"),
            os.path.join(work, f"eval-{method}.json"),
            lengths,
            args.nproc,
            args.passkey_trials,
        )

    pi = results["base + PI, not tuned"]["perplexity"][str(args.target)]
    full = results.get("full", {}).get("perplexity", {}).get(str(args.target))
    for name, r in results.items():
        ppl = [f"{r['perplexity'][str(n)]:.2f}" for n in lengths]
        key = [f"{r['passkey'][str(n)]['accuracy']:.2f}/{r['passkey'][str(n)]['token_accuracy']:.2f}" for n in lengths]
        mine = r["perplexity"][str(args.target)]
        gain = f"{(pi - mine) / (pi - full):.2f}" if full is not None and pi != full and name in times else ""
        rows.append([name, *ppl, *key, gain, f"{times[name]:.0f}" if name in times else ""])
    header = ["model", *(f"ppl {n}" for n in lengths), *(f"passkey {n}" for n in lengths), "improvement", "tune s"]
    print(markdown_table(header, rows))
    print("\npasskey cells: exact retrieval / answer-token accuracy")
    with open(os.path.join(work, "study.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "tune_seconds": times}, f, indent=1)


if __name__ == "__main__":
    main()
