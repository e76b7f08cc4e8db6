"""Evaluate a causal LM for long context: perplexity by length and passkey retrieval.

    python launch/eval.py --model runs/ft/merged --lengths 1024,2048,4096,8192
    torchrun --nproc-per-node 2 launch/eval.py --model runs/ft/merged --lengths 32768 --passkey-trials 0
    python launch/eval.py --model base --extend-to 8192 --lengths 8192   # a base model, interpolated

Full causal attention on lsts kernels; under torchrun every window is sequence-parallel over all
ranks (ring, zigzag). ``--h2o HEAVY,RECENT[,ALPHA]`` also runs the passkey trials by greedy
generation with an H2O / A2SF KV cache (one process), to see what the eviction keeps.
Results: a markdown table on stdout and, with ``--out``, a JSON file; progress (one line per length
and task, longest length first) on stderr. A mistake is one ``error:`` line (``--debug``: its traceback).
"""

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lsts.cli import run, setup_logging

log = logging.getLogger("lsts.eval")
BACKENDS = ("auto", "torch", "triton", "reference")  # = lsts.kernels.backend.BACKENDS


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    model = "HF checkpoint directory (e.g. a fine-tuning run's merged/)"
    p.add_argument("--model", required=True, default=argparse.SUPPRESS, help=model)
    p.add_argument("--extend-to", type=int, default=0, help="apply linear RoPE interpolation for this length first")
    p.add_argument("--lengths", type=_ints, default="1024,2048,4096,8192", help="context lengths, comma-separated")
    p.add_argument("--stride", type=int, default=256, help="a perplexity window starts every STRIDE tokens")
    p.add_argument("--max-windows", type=int, default=4, help="perplexity windows per length")
    p.add_argument("--data", default="stdlib", help="evaluation text: 'stdlib', a .txt/.jsonl path or HF dataset")
    p.add_argument("--eval-tokens", type=int, default=65536, help="take the last N tokens of the text")
    p.add_argument("--tokenizer", default="auto", help="'auto' (the checkpoint's, else bytes), 'byte' or a path")
    p.add_argument("--passkey-trials", type=int, default=4, help="random keys per (length, depth); 0 = skip")
    p.add_argument("--depths", type=_floats, default="0,0.5,1", help="relative depths of the key")
    p.add_argument("--h2o", default="", help="HEAVY,RECENT[,ALPHA]: also generate passkeys with an H2O cache")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="attention kernels")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    return p.parse_args(argv)


def main(argv=None) -> None:
    run(_main, argv)


def _main(argv: list[str]) -> None:
    args = parse_args(argv)  # --help ends here, before torch is imported
    setup_logging()
    results = evaluate(args)
    if results is not None and args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def evaluate(args) -> dict | None:
    """Run the evaluation; the results on rank 0 (None elsewhere)."""
    import torch
    import torch.distributed as dist

    from lsts.attention import AttentionContext
    from lsts.finetune.base import load_base_config
    from lsts.finetune.recipes import load_extended
    from lsts.finetune.trainer import CausalLMLoss, resolve_tokenizer
    from lsts.models.hf import use_lsts_attention
    from lsts.parallel.comm import init_process_group
    from lsts.train.data import load_corpus, load_tokenizer

    if "RANK" in os.environ:
        init_process_group()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.h2o and world > 1:
        raise ValueError("--h2o generates on one process; run it without torchrun")
    bad = [n for n in args.lengths if n % (2 * world)]
    if bad:
        raise ValueError(f"lengths {bad} cannot be cut into {2 * world} zigzag chunks; use multiples of {2 * world}")

    from transformers import AutoModelForCausalLM

    load_base_config(args.model)  # a model lsts cannot run is refused before its weights are read
    log.info("loading %s", args.model)
    if args.extend_to:
        hf = load_extended(args.model, args.extend_to)
    else:
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    hf.eval()
    ctx = AttentionContext(mode="ring" if world > 1 else "local", backend=args.backend)
    use_lsts_attention(hf, ctx=ctx)
    model = CausalLMLoss(hf, backend="auto")

    tokenizer = load_tokenizer(resolve_tokenizer(args.tokenizer, args.model))
    log.info("reading and tokenizing the evaluation text (%s)", args.data)
    corpus = load_corpus(args.data, tokenizer)
    log.info("%d tokens; evaluating the last %d", len(corpus.tokens), min(args.eval_tokens, len(corpus.tokens)))
    stream = torch.from_numpy(corpus.tokens[-args.eval_tokens :].astype("int64"))

    ppl, trials = _measure(model, tokenizer, stream, ctx, args, rank)
    results = {
        "model": args.model,
        "extend_to": args.extend_to,
        "perplexity": {str(k): v for k, v in ppl.items()},
        "passkey": _passkey_summary(trials, args.lengths),
    }
    if args.h2o:
        results["passkey_h2o"] = _h2o_passkey(hf, tokenizer, args)
    if rank == 0:
        _print(results, args.lengths)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results if rank == 0 else None


def _measure(model, tokenizer, stream, ctx, args, rank: int):
    """Perplexity and teacher-forced passkey trials per length, as `perplexity_by_length` and
    `passkey_by_length` compute them (the same keys), with a progress line per length and task.
    The longest length goes first: a text too short for it fails before any other work."""
    import random

    from tqdm import tqdm

    from lsts.finetune.evaluate import passkey_trial, perplexity_by_length

    keys = random.Random(args.seed)  # drawn in passkey_by_length's order: length, depth, trial
    plan = {n: [str(keys.randint(10000, 99999)) for _ in args.depths for _ in range(args.passkey_trials)]
            for n in args.lengths}  # fmt: skip
    ppl, trials = {}, []
    tasks = len(args.lengths) * (1 + len(args.depths) * args.passkey_trials)
    with tqdm(total=tasks, desc="eval", unit="task", disable=None if rank == 0 else True) as bar:
        for n in sorted(args.lengths, reverse=True):
            t0 = time.perf_counter()
            ppl.update(perplexity_by_length(model, stream, [n], ctx, args.stride, args.max_windows))
            bar.update()
            log.info("length %d: perplexity %.3f (%.1f s)", n, ppl[n], time.perf_counter() - t0)
            if not args.passkey_trials:
                continue
            t0 = time.perf_counter()
            depths = [d for d in args.depths for _ in range(args.passkey_trials)]
            for depth, key in zip(depths, plan[n]):
                trials.append(passkey_trial(model, tokenizer, n, depth, key, ctx))
                bar.update()
            hits = sum(t.retrieved for t in trials if t.length == n)
            log.info("length %d: passkey %d/%d retrieved (%.1f s)", n, hits, len(depths), time.perf_counter() - t0)
    return ppl, trials


def _passkey_summary(trials, lengths) -> dict:
    out = {}
    for n in lengths:
        mine = [t for t in trials if t.length == n]
        if mine:
            out[str(n)] = {
                "accuracy": sum(t.retrieved for t in mine) / len(mine),
                "token_accuracy": sum(t.token_accuracy for t in mine) / len(mine),
                "trials": len(mine),
            }
    return out


def _h2o_passkey(hf, tokenizer, args) -> dict:
    """Greedy generation of the key against an H2O cache, per length."""
    import random

    import torch

    from lsts.finetune.evaluate import passkey_prompt
    from lsts.inference import H2OCache, attach_h2o, detach_h2o

    heavy, recent, *alpha = _floats(args.h2o)
    rng, out = random.Random(args.seed), {}
    for n in args.lengths:
        hits = 0
        for depth in args.depths:
            for _ in range(args.passkey_trials):
                key = str(rng.randint(10000, 99999))
                prompt, answer = passkey_prompt(tokenizer, n, depth, key)
                cache = attach_h2o(hf, H2OCache(int(heavy), int(recent), alpha[0] if alpha else 1.0))
                with torch.no_grad():
                    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=len(answer), do_sample=False, cache=cache)[
                        0, len(prompt) :
                    ]
                detach_h2o(hf)
                hits += ids.tolist() == answer
        out[str(n)] = {"accuracy": hits / (len(args.depths) * args.passkey_trials), "budget": args.h2o}
    return out


def _print(results: dict, lengths) -> None:
    print(f"\n{results['model']}" + (f" (RoPE interpolated to {results['extend_to']})" if results["extend_to"] else ""))
    cols = ["metric", *map(str, lengths)]

    def row(label, section, field, fmt):
        return [label, *(fmt.format(results[section].get(str(n), {}).get(field, float("nan"))) for n in lengths)]

    rows = [["perplexity", *(f"{results['perplexity'][str(n)]:.3f}" for n in lengths)]]
    if results.get("passkey"):
        rows.append(row("passkey accuracy", "passkey", "accuracy", "{:.2f}"))
        rows.append(row("passkey token accuracy", "passkey", "token_accuracy", "{:.2f}"))
    if results.get("passkey_h2o"):
        rows.append(row("passkey accuracy, H2O cache", "passkey_h2o", "accuracy", "{:.2f}"))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
