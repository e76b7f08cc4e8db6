"""SPT kernels (``docs/algorithms.md`` §8; Gui et al., "SPT: Fine-Tuning Transformer-based Language Models
Efficiently with Sparsification", 2024): a product quantizer per attention module (`pq`), sparse MHA
over the top-L keys by code collisions (`sparse_attention`), and the routed FFN (`routed_ffn`).
Each op has a ``torch`` CPU twin, a ``reference`` oracle and Triton kernels (`spt.triton`, imported
only when the ``triton`` backend runs); backends as in `lsts.kernels.backend`.
"""

from lsts.kernels.spt.pq import ProductQuantizer
from lsts.kernels.spt.routed_ffn import ROUTER_SCALE, Routing, route, routed_ffn, routed_ffn_reference
from lsts.kernels.spt.sparse_attention import (
    budget_for,
    dense_mask,
    select_keys,
    select_keys_reference,
    sparse_attention,
    sparse_attention_reference,
)

__all__ = [
    "ROUTER_SCALE",
    "ProductQuantizer",
    "Routing",
    "budget_for",
    "dense_mask",
    "route",
    "routed_ffn",
    "routed_ffn_reference",
    "select_keys",
    "select_keys_reference",
    "sparse_attention",
    "sparse_attention_reference",
]
