"""One DeepSpeed ALST training step of a Llama model built locally from a config (no download), for
``bench/longest.py``: run on every rank by torchrun (under ``bench/_rss_guard.py``).

ALST as its tutorial composes it: ``UlyssesSPAttentionHF.register_with_transformers`` (Ulysses
sequence parallelism over all ranks around SDPA), ``TiledMLP`` patched into ``LlamaMLP.forward``
(shards of ``hidden_size`` tokens, the count agreed by an all-reduce), ``TiledFusedLogitsLoss`` for
the output projection and loss, HF activation checkpointing, and a DeepSpeed engine with ZeRO stage
3 and AdamW. Every rank feeds its contiguous ``seq_len / world`` slice of one random sequence, with
its position ids and the labels shifted on the whole sequence, as ``UlyssesSPDataLoaderAdapter``
does.
"""

from __future__ import annotations

import argparse
import math
import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss, TiledMLP, UlyssesSPAttentionHF
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama


def tiled_mlp_forward(self, x):
    # Shards of about hidden_size tokens, as the TiledMLP docstring does; every rank must agree on the count.
    n = torch.tensor(math.ceil(x.shape[-2] / x.shape[-1]))
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
    return TiledMLP.apply(lambda m, h: m.down_proj(m.act_fn(m.gate_proj(h)) * m.up_proj(h)), self, x, int(n), params)


def loss_fn(lm_head, x, y):
    logits = lm_head(x).float()
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn-dim", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--loss-shard-tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.seq_len % world:
        raise ValueError(f"--seq-len ({args.seq_len}) must be a multiple of the {world} ranks")

    modeling_llama.LlamaMLP.forward = tiled_mlp_forward
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn_dim, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation="sdpa", sequence_parallel_size=world, micro_batch_size=1,
        seq_length=args.seq_len, seq_length_is_variable=False,
    )  # fmt: skip
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "sequence_parallel_size": world,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)  # shifted on the whole sequence
    local = args.seq_len // world
    sl = slice(rank * local, (rank + 1) * local)
    positions = torch.arange(args.seq_len).unsqueeze(0)

    hidden = engine.module.model(input_ids=ids[:, sl], position_ids=positions[:, sl]).last_hidden_state
    lm_head = engine.module.lm_head
    shards = max(1, math.ceil(local / args.loss_shard_tokens))
    y = labels[:, sl]
    loss_sum = TiledFusedLogitsLoss.apply(loss_fn, lm_head, hidden, y, None, shards, [lm_head.weight], "sum")
    loss = loss_sum / (y != -100).sum()
    engine.backward(loss)
    engine.step()
    if rank == 0:
        print(f"alst step done: seq_len {args.seq_len}, loss {loss.item():.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
