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
