"""Models built on the lsts attention API: `MASFormer` (own decoder LM with per-layer attention spans)."""

from lsts.models.masformer import Attention, FeedForward, MASFormer, TransformerBlock, check_model_config

__all__ = ["Attention", "FeedForward", "MASFormer", "TransformerBlock", "check_model_config"]
