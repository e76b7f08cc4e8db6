"""Inference-side pieces of long-context fine-tuning: decoding against long KV caches.

- `split_k_attention` (`lsts.kernels.attention.split_k`, re-exported here): decode attention with the
  keys cut into equal work units whose partial ``(out, lse)`` merge (Lean Attention's split-K), also
  across ranks that shard the cache. It lives with the kernels so that the model layer
  (`lsts.models.hf`) can use it without importing this package, which builds on the models.
- `H2OCache` (``h2o.py``): a ``transformers.Cache`` that keeps, per head, the recent tokens plus
  the heavy hitters of the accumulated attention (H2O), optionally decayed (A2SF); `attach_h2o`
  connects it to a model running lsts attention.

The H2O names load on first use (PEP 562): they import transformers, which split-K decoding on
sharded caches does not need (and which costs seconds in every spawned rank).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lsts.kernels.attention.split_k import split_bounds, split_k_attention

if TYPE_CHECKING:
    from lsts.inference.h2o import H2OCache, H2OLayer, accumulated_attention, attach_h2o, detach_h2o, keep_indices

__all__ = [
    "H2OCache",
    "H2OLayer",
    "accumulated_attention",
    "attach_h2o",
    "detach_h2o",
    "keep_indices",
    "split_bounds",
    "split_k_attention",
]
_H2O = frozenset(__all__) - {"split_bounds", "split_k_attention"}


def __getattr__(name: str):
    if name in _H2O:
        return getattr(importlib.import_module("lsts.inference.h2o"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
