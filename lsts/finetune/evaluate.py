"""Long-context evaluation of a causal LM (``launch/eval.py``): perplexity by context length and
passkey retrieval by length and depth, with full causal attention, sequence-parallel over every
rank for long inputs.

Perplexity by context length (sliding windows, LongLoRA's stride of 256): windows of ``length``
tokens ending every ``stride`` tokens at the end of a held-out stream, each scoring only its last
``stride`` predictions. Every length then scores the *same* tokens, each seen with between
``length - stride`` and ``length`` tokens of context, so the numbers compare across lengths. Each
window is sharded over the ranks (zigzag, ring attention), so a window longer than one device holds
still fits.

Passkey retrieval (Mohtashami & Jaggi; LongLoRA's prompt): a 5-digit key hidden at a relative
depth inside repeated filler sentences, then "What is the pass key? The pass key is". Greedy
decoding returns the key exactly when, at every answer position, the argmax of the logits given the
prompt and the key's earlier tokens is the key's next token — which one teacher-forced forward over
``prompt + answer`` decides. So a trial is one (sequence-parallel) forward, not a decode loop.
Token accuracy (the share of answer tokens predicted) is reported beside exact retrieval.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lsts.attention import AttentionContext
from lsts.finetune.trainer import CausalLMLoss
from lsts.parallel import gather_sequence, shard_sequence
from lsts.train.data import IGNORE_INDEX

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _shard(x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    return x if ctx.mode == "local" else shard_sequence(x, ctx.ring_group, layout=ctx.layout)


def _world(ctx: AttentionContext) -> int:
    return 1 if ctx.mode == "local" else dist.get_world_size(ctx.ring_group)


@torch.no_grad()
def window_loss(
    model: CausalLMLoss, tokens: torch.Tensor, ctx: AttentionContext, scored: int | None = None
) -> tuple[float, int]:
    """Summed next-token loss over the last ``scored`` predictions (all by default) of one window
    ``tokens [L + 1]``, and their count; the window is sharded under ``ctx``."""
    inputs, labels = tokens[None, :-1], tokens[None, 1:].clone()
    if scored is not None:
        labels[:, : labels.shape[1] - scored] = IGNORE_INDEX
    positions = torch.arange(inputs.shape[1])[None]
    loss = model(*(_shard(x, ctx) for x in (inputs, positions)), ctx, _shard(labels, ctx))
    if ctx.mode != "local":
        dist.all_reduce(loss, group=ctx.ring_group)
    return float(loss), int((labels != IGNORE_INDEX).sum())


def perplexity_by_length(
    model: CausalLMLoss,
    stream: torch.Tensor,
    lengths: list[int],
    ctx: AttentionContext,
    stride: int = 256,
    max_windows: int = 8,
) -> dict[int, float]:
    """Perplexity at each context length: windows of ``length`` tokens ending every ``stride``
    tokens at the end of ``stream``, each scoring its last ``stride`` predictions."""
    need = max(lengths) + stride * (max_windows - 1) + 1
    if len(stream) < need:
        raise ValueError(
            f"the evaluation text has {len(stream)} tokens; {max_windows} windows of up to {max(lengths)} "
            f"every {stride} need {need}: add text or lower the lengths / windows"
        )
    ends = [len(stream) - k * stride for k in range(max_windows)]
    result = {}
    for length in lengths:
        total, count = 0.0, 0
        for end in ends:
            loss, n = window_loss(model, stream[end - length - 1 : end], ctx, min(stride, length))
            total, count = total + loss, count + n
        result[length] = math.exp(total / count)
    return result


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    retrieved: bool
    token_accuracy: float


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt of about ``length`` tokens with the key at relative ``depth``, and of
    the answer (`` key``)."""
    enc = lambda text: [int(t) for t in tokenizer.encode_batch([text])[0]]  # noqa: E731
    intro, filler, needle, question = (
        enc(PASSKEY_INTRO),
        enc(PASSKEY_FILLER),
        enc(PASSKEY_NEEDLE.format(key=key)),
        enc(PASSKEY_QUESTION),
    )
    answer = enc(" " + key)
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    n_filler = max(0, room // len(filler))
    before = round(depth * n_filler)
    body = filler * before + needle + filler * (n_filler - before)
    return intro + body + question, answer


@torch.no_grad()
def answer_hits(model: CausalLMLoss, prompt: list[int], answer: list[int], ctx: AttentionContext) -> torch.Tensor:
    """``[len(answer)]`` bools: whether the argmax after ``prompt + answer[:t]`` is ``answer[t]``. All
    true exactly when greedy decoding from ``prompt`` generates ``answer``."""
    ids = torch.tensor(prompt + answer)
    pad = -len(ids) % (2 * _world(ctx))  # the zigzag layout cuts 2P chunks: pad the end, never read
    ids = torch.cat([ids, ids.new_zeros(pad)])[None]
    positions = torch.arange(ids.shape[1])[None]
    hidden = model.hidden_states(_shard(ids, ctx), _shard(positions, ctx), ctx)
    if ctx.mode != "local":
        hidden = gather_sequence(hidden, ctx.ring_group, layout=ctx.layout)
    at = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)  # the positions that predict the answer
    return model.causal_lm.get_output_embeddings()(hidden[0, at]).argmax(-1) == torch.tensor(answer)


def passkey_trial(model: CausalLMLoss, tokenizer, length: int, depth: float, key: str, ctx) -> PasskeyTrial:
    """One teacher-forced forward over ``prompt + answer`` (see the module docstring)."""
    hits = answer_hits(model, *passkey_prompt(tokenizer, length, depth, key), ctx)
    return PasskeyTrial(length, depth, key, bool(hits.all()), float(hits.float().mean()))


def passkey_by_length(
    model: CausalLMLoss,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int,
    ctx: AttentionContext,
    seed: int = 0,
) -> list[PasskeyTrial]:
    """``trials`` random keys at every (length, depth); the same keys on every rank."""
    rng = random.Random(seed)
    return [
        passkey_trial(model, tokenizer, length, depth, str(rng.randint(10000, 99999)), ctx)
        for length in lengths
        for depth in depths
        for _ in range(trials)
    ]


__all__ = [
    "PasskeyTrial",
    "answer_hits",
    "passkey_by_length",
    "passkey_prompt",
    "passkey_trial",
    "perplexity_by_length",
    "window_loss",
]
