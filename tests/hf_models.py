"""Small Hugging Face checkpoints the tests build themselves (nothing is downloaded)."""

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def save_tiny_llama(path, max_position_embeddings: int = 256, vocab_size: int = 97):
    """A 2-layer Llama with GQA (4 query heads, 2 K/V heads), saved with ``save_pretrained``
    (``vocab_size=256`` fits the byte tokenizer of the trainer's data)."""
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


# Tiny configs of decoders from the installed transformers, each with the attention features that
# make it differ from plain causal softmax switched on at a size the tests reach (windows and
# chunks of 8 tokens on 24-token rows). Built from their config classes: nothing is downloaded.
_COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attention_dropout=0.0, pad_token_id=0,
)  # fmt: skip
_TWO_KINDS = ["sliding_attention", "full_attention"]
TINY_ARCHS = {
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": {},
    "gemma": {},
    "gemma2": dict(sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=None),
    "gemma3_text": dict(sliding_window=8, layer_types=_TWO_KINDS),
    "gemma3_text:bidirectional": dict(use_bidirectional_attention=True, layer_types=["full_attention"] * 2),
    "cohere": {},
    "cohere2": dict(sliding_window=8, layer_types=_TWO_KINDS),
    "starcoder2": dict(sliding_window=8),
    "gpt_oss": dict(sliding_window=8, num_local_experts=4, num_experts_per_tok=2, layer_types=_TWO_KINDS),
    "llama4_text": dict(  # chunked attention
        attention_chunk_size=8,
        num_local_experts=2,
        interleave_moe_layer_step=1,
        intermediate_size_mlp=96,
        layer_types=["chunked_attention", "full_attention"],
        no_rope_layers=[1, 0],
        attn_temperature_tuning=False,  # it scales queries by the position in the *row*: packing would change it
    ),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": {},
    "gpt_neox": {},
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "olmo": {},
    "olmo2": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "granite": {},
    "deepseek_v3": dict(
        head_dim=8,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=8,  # MLA: values narrower than queries and keys
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        moe_intermediate_size=32,
    ),
    "smollm3": {},
    "glm": {},
    "exaone4": dict(sliding_window=8),
}


def tiny_causal_lm(arch: str, attn_implementation: str = "eager", seed: int = 0):
    """A 2-layer random ``*ForCausalLM`` of ``arch`` (a key of `TINY_ARCHS`: a model type, or
    ``type:variant``), float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch.split(":")[0], **{**_COMMON, **TINY_ARCHS[arch]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def parity_errors(arch: str, mode: str, length: int = 24) -> dict[str, float]:
    """Relative errors of ``arch`` on lsts attention against the same weights on ``eager``:
    ``{"logits": e, "grad": worst parameter gradient's e, "grad_param": its name}``.

    ``mode``: "plain" (2 rows), "left_padded" (2 rows, 5 pads on the first; real tokens only) or
    "packed" (one row of two documents with restarting position_ids, against each document run
    alone). The loss is a fixed random projection of the logits, so every logit has a gradient."""
    import copy

    ref = tiny_causal_lm(arch)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("lsts")
    gen = torch.Generator().manual_seed(1)
    vocab = ref.config.vocab_size
    if mode == "packed":
        lengths = [length // 2 - 1, length - length // 2 + 1]
        tokens = torch.randint(1, vocab, (1, length), generator=gen)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        w = torch.randn(length, vocab, generator=gen, dtype=torch.float64)
        got = ours(tokens, position_ids=positions, use_cache=False).logits[0]  # transformers packs without a cache
        (got.double() * w).sum().backward()
        parts, start = [], 0
        for n in lengths:
            out = ref(tokens[:, start : start + n]).logits[0]
            (out.double() * w[start : start + n]).sum().backward()
            parts.append(out.detach())
            start += n
        want = torch.cat(parts)
    else:
        tokens = torch.randint(1, vocab, (2, length), generator=gen)
        mask = torch.ones_like(tokens)
        if mode == "left_padded":
            mask[0, :5] = 0
        elif mode != "plain":
            raise ValueError(f"unknown parity mode {mode!r}")
        keep = mask.bool()
        w = torch.randn(int(keep.sum()), vocab, generator=gen, dtype=torch.float64)
        outs = []
        for model in (ours, ref):
            out = model(tokens, attention_mask=mask).logits[keep]
            (out.double() * w).sum().backward()
            outs.append(out.detach())
        got, want = outs
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    if grads.keys() != ref_grads.keys():
        raise AssertionError(f"parameters with gradients differ: {sorted(grads.keys() ^ ref_grads.keys())}")
    errors = {n: _rel(grads[n], g) for n, g in ref_grads.items()}
    worst = max(errors, key=errors.get)
    return {"logits": _rel(got.detach(), want), "grad": errors[worst], "grad_param": worst}


# Tiny decoders of other families: 2 layers, hidden 64, 4 heads, the byte tokenizer's 256 ids, and
# each family's own attention and position settings (fused projections, partial rotary, windows,
# softcapping) where it has them. Special token ids are set inside the vocabulary.
TINY_DECODERS = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 32}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    # final_logit_softcapping is off: the fine-tuning loss head has none (the job refuses it)
    "gemma2": (
        "Gemma2Config",
        {
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": 32,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": None,
            "query_pre_attn_scalar": 16,
        },
    ),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5}),  # fused qkv_proj and gate_up_proj
    "gpt_neox": ("GPTNeoXConfig", {"partial_rotary_factor": 0.25}),  # fused query_key_value
    "gpt2": (
        "GPT2Config",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    ),  # Conv1D projections, learned positions
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "deepseek_v3": (
        "DeepseekV3Config",
        {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1},
    ),  # MLA projections, a dense and a MoE layer
}


def tiny_decoder(arch: str, max_position_embeddings: int = 32, vocab_size: int = 256):
    """A seeded random ``*ForCausalLM`` of ``arch`` (a key of `TINY_DECODERS`)."""
    name, extra = TINY_DECODERS[arch]
    common = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    if arch == "gpt2":
        common = {"n_positions": max_position_embeddings}
    else:
        common["max_position_embeddings"] = max_position_embeddings
    cfg = getattr(transformers, name)(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common, **extra
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def save_tiny_decoder(path, arch: str, max_position_embeddings: int = 32, vocab_size: int = 256):
    """`tiny_decoder`, saved with ``save_pretrained``."""
    tiny_decoder(arch, max_position_embeddings, vocab_size).save_pretrained(path)
    return path
