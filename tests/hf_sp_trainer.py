"""Training runs for tests/test_hf_sequence_parallel.py, launched as ``torchrun --nproc-per-node N
tests/hf_sp_trainer.py CHECKPOINT OUT RUN...`` (one process: the plain transformers baseline on
``eager`` attention; N processes: lsts sequence parallelism over all of them, cp = N).

A run is ``KIND:MODE[:CP[:GA]]``: KIND ``trainer`` (``transformers.Trainer``, rows of different
lengths, right-padded, batch 2), ``sft`` (TRL ``SFTTrainer``, packing on) or ``trainer_bf16`` (the
Trainer run under ``bf16=True`` autocast); MODE ``ring``, ``ulysses`` or ``hybrid`` (Ulysses degree
2); CP the context-parallel degree (default: every process); GA the gradient accumulation (default
2). Rank 0 writes ``{run: [{"loss": ..., "grad_norm": ...} per step] or {"error": ...}}`` to OUT as
JSON.
"""

import json
import os
import sys
import tempfile

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from lsts.models.hf import sequence_parallel

STEPS = 3
# Plain SGD and no clipping: a gradient off by any factor shows in the next steps' losses.
COMMON = {
    "max_steps": STEPS,
    "logging_steps": 1,
    "learning_rate": 0.5,
    "optim": "sgd",
    "lr_scheduler_type": "constant",
    "max_grad_norm": 1e9,
    "use_cpu": True,
    "report_to": [],
    "save_strategy": "no",
    "seed": 0,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


def token_rows(n=16, vocab=97):
    """Rows of different lengths (so ranks pad differently), some not divisible by 2·cp."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(7, 30, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (m,), generator=g).tolist() for m in lengths]


def pad_right(samples):
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
        mask[i, : len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def char_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]", *"abcdefghijklmnopqrstuvwxyz ."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(path)
    return fast


def texts(n=24):
    g = torch.Generator().manual_seed(5)
    letters = "abcdefghijklmnopqrstuvwxyz ."
    return [
        "".join(letters[i] for i in torch.randint(0, len(letters), (int(m),), generator=g))
        for m in torch.randint(5, 40, (n,), generator=g)
    ]


def run(checkpoint, kind, mode, out_dir, cp=None, ga=2):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp, ga = int(cp or world), int(ga)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    bf16 = kind.endswith("bf16")
    common = {
        **COMMON,
        "bf16": bf16,
        "gradient_accumulation_steps": ga,
        **({"ddp_backend": "gloo"} if world > 1 else {}),
    }
    ulysses = 2 if mode == "hybrid" else None
    if kind.startswith("trainer"):
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, **common)
        sp = sequence_parallel(model, cp, mode, ulysses, backend="torch") if world > 1 else None
        ds = Dataset.from_dict({"input_ids": token_rows()})
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=pad_right)
    else:
        from trl import SFTConfig, SFTTrainer

        tokenizer = char_tokenizer(os.path.join(out_dir, "tok"))
        args = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=1, packing=True,
            max_length=64, **common,
        )  # fmt: skip
        sp = sequence_parallel(model, cp, mode, ulysses, backend="torch") if world > 1 else None
        ds = Dataset.from_dict({"text": texts()})
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    if sp is not None:
        trainer = sp.wrap(trainer)
    trainer.train()
    return [{"loss": h["loss"], "grad_norm": h["grad_norm"]} for h in trainer.state.log_history if "loss" in h]


def main(checkpoint, out, *runs):
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in runs:
            kind, mode, *degrees = spec.split(":")
            try:  # a run's error (the same on every rank) is its result: the next runs still go
                results[spec] = run(checkpoint, kind, mode, os.path.join(tmp, spec.replace(":", "_")), *degrees)
            except Exception as e:
                results[spec] = {"error": f"{type(e).__name__}: {e}"}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
