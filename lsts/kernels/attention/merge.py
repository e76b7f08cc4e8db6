"""The merge rule of partial attention results over disjoint key sets (``docs/algorithms.md`` §1).

    lse = logaddexp(lse1, lse2);  out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2

Associative and order-free; merging with a fully masked block (lse = -inf) is the identity. Ring
attention, split-K decoding and the KV-cache paths all fold partial results through this function.
"""

from __future__ import annotations

import torch


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold ``(block_out, block_lse)`` into the accumulators ``out [B, S, H, D]``, ``lse [B, H, S]``
    in place. Accumulators are float32 (float64 for float64 inputs) whatever the block dtype."""
    new_lse = torch.logaddexp(lse, block_lse.to(lse.dtype))
    # Where both sides are -inf the row has seen no key yet: keep out = 0 instead of 0 * nan.
    ref = new_lse.masked_fill(torch.isinf(new_lse), 0.0)
    w_old = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(block_lse.to(lse.dtype) - ref).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).addcmul_(block_out, w_new)  # no block-sized temporary
    lse.copy_(new_lse)
