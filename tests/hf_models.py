"""Small Hugging Face checkpoints the tests build themselves (nothing is downloaded)."""

import torch
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
