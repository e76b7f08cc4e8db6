"""Which Hugging Face checkpoints lsts can fine-tune and evaluate, decided from the config alone,
before any weight is read: a decoder-only causal LM whose attention dispatches through
``transformers.AttentionInterface`` (where ``attn_implementation="lsts"`` plugs in).

Read from the checkpoint's ``config.json``: the model type must have a ``*ForCausalLM`` class in
transformers' causal-LM mapping, must not be an encoder-decoder (T5) nor an encoder (BERT's
``is_decoder`` is false), and that class must declare ``_supports_attention_backend``.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

SUPPORTED = "a decoder-only causal LM on transformers' AttentionInterface (Llama, Mistral, Qwen2, ...)"


def load_base_config(name: str) -> PretrainedConfig:
    """The config of checkpoint ``name`` (a local directory or a hub name in the local cache);
    ValueError naming the reason when it is missing or not a model lsts runs."""
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{name!r} is neither a local checkpoint directory nor a hub name in the local cache "
            f"({type(e).__name__}); save one with save_pretrained and pass its path"
        ) from e
    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False) or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{name}: a {kind!r} model is not a causal LM; lsts needs {SUPPORTED}")
    # Encoders that can also be decoders (BERT, RoBERTa: token-type embeddings) say so by is_decoder;
    # decoder-only configs that carry the flag (GPT-NeoX) leave it false.
    if getattr(config, "is_decoder", None) is False and hasattr(config, "type_vocab_size"):
        raise ValueError(f"{name}: this {kind!r} model is an encoder (is_decoder = false); lsts needs {SUPPORTED}")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not getattr(model_class, "_supports_attention_backend", False):
        raise ValueError(
            f"{name}: {model_class.__name__} does not dispatch its attention through transformers' "
            f"AttentionInterface, so lsts attention cannot plug in; lsts needs {SUPPORTED}"
        )
    return config


__all__ = ["load_base_config"]
