"""Product quantizer of SPT's sparse MHA (``docs/algorithms.md`` §8): codes for queries and keys whose
collisions pick the keys each query attends.

A head vector ``z [D]`` is cut into ``D / sub_dim`` sub-vectors of ``sub_dim`` dims (8 in SPT); each
sub-space has its own ``n_codes`` codewords (16 in SPT), and a sub-vector's code is the index of its
nearest codeword under the L1 distance. One quantizer serves one attention module: all its heads and
both q and k, so that a query's and a key's codes can be compared.

Codebook training (an auxiliary loss, weight 1e-2 in SPT, applied by the caller): the mean squared
distance of each sub-vector to its assigned codeword, with the sub-vectors detached, so that the
codebooks move toward the data (an online k-means step) while the model's weights feel nothing.
The squared distance (rather than L1) is our choice: the paper's form is **(unconfirmed)**; it gives a
smooth gradient and its minimiser is the assigned vectors' mean. The codebooks start from random
sub-vectors of the first batch seen (`initialize`), not from noise, so no codeword starts empty; under
data parallelism that first batch must be the same on every rank (`lsts.finetune.spt.calibrate`).

Sources: Jégou et al., "Product Quantization for Nearest Neighbor Search" (2011); Gui et al., "SPT:
Fine-Tuning Transformer-based Language Models Efficiently with Sparsification" (2024).

Limits: encoding compares every sub-vector with every codeword (``cdist``, ``O(M·D·n_codes)``), in
chunks of `_ENCODE_CHUNK` vectors so the distance table stays small.
"""

from __future__ import annotations

import torch
from torch import nn

_ENCODE_CHUNK = 1 << 16  # vectors per cdist call: the [n_sub, chunk, n_codes] table stays ~64 MiB


class ProductQuantizer(nn.Module):
    """Codebooks ``[n_sub, n_codes, sub_dim]`` for vectors of ``head_dim = n_sub * sub_dim`` dims."""

    def __init__(self, head_dim: int, sub_dim: int = 8, n_codes: int = 16) -> None:
        super().__init__()
        if sub_dim < 1 or head_dim % sub_dim:
            raise ValueError(f"head_dim {head_dim} must be a multiple of the sub-vector size {sub_dim}")
        if not 2 <= n_codes <= 256:
            raise ValueError(f"n_codes must be in [2, 256] (codes are stored as uint8), got {n_codes}")
        self.head_dim, self.sub_dim, self.n_codes = head_dim, sub_dim, n_codes
        self.n_sub = head_dim // sub_dim
        self.codebooks = nn.Parameter(torch.randn(self.n_sub, n_codes, sub_dim))
        self.register_buffer("initialized", torch.tensor(False))

    def _split(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[n_sub, M, sub_dim]`` (M vectors), in the codebooks' dtype."""
        if z.shape[-1] != self.head_dim:
            raise ValueError(f"expected vectors of {self.head_dim} dims, got shape {tuple(z.shape)}")
        return z.reshape(-1, self.n_sub, self.sub_dim).transpose(0, 1).to(self.codebooks.dtype)

    @torch.no_grad()
    def initialize(self, z: torch.Tensor, seed: int = 0) -> None:
        """Codewords from ``n_codes`` distinct random vectors of ``z [..., D]`` per sub-space. The
        choice is seeded, so ranks that see the same ``z`` build the same codebooks."""
        subs = self._split(z.detach())  # [n_sub, M, sub_dim]
        m = subs.shape[1]
        if m < self.n_codes:
            raise ValueError(f"initializing {self.n_codes} codewords needs as many vectors, got {m}")
        gen = torch.Generator(device=subs.device).manual_seed(seed)
        for s in range(self.n_sub):
            pick = torch.randperm(m, device=subs.device, generator=gen)[: self.n_codes]
            self.codebooks[s].copy_(subs[s, pick])
        self.initialized.fill_(True)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., n_sub]`` (uint8) of ``z [..., D]``: the L1-nearest codeword per sub-space
        (ties: the lower code, as ``argmin``)."""
        subs = self._split(z)
        codes = torch.empty(subs.shape[:2], dtype=torch.uint8, device=z.device)
        for start in range(0, subs.shape[1], _ENCODE_CHUNK):
            part = subs[:, start : start + _ENCODE_CHUNK]
            codes[:, start : start + _ENCODE_CHUNK] = torch.cdist(part, self.codebooks, p=1).argmin(-1)
        return codes.transpose(0, 1).reshape(*z.shape[:-1], self.n_sub)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors ``[..., D]`` of codes ``[..., n_sub]``: each sub-space's codeword, concatenated."""
        flat = codes.reshape(-1, self.n_sub).long()  # [M, n_sub]
        sub = torch.arange(self.n_sub, device=codes.device)
        words = self.codebooks[sub[None, :], flat]  # [M, n_sub, sub_dim]
        return words.reshape(*codes.shape[:-1], self.head_dim)

    def codebook_loss(self, *zs: torch.Tensor) -> torch.Tensor:
        """Mean squared distance of the (detached) sub-vectors of every ``z`` to their codewords; a
        gradient reaches the codebooks only. Initializes the codebooks from the first call's data."""
        zs = tuple(z.detach() for z in zs)
        if not bool(self.initialized):
            self.initialize(torch.cat([z.reshape(-1, self.head_dim) for z in zs]))
        total, count = 0.0, 0
        for z in zs:
            diff = self.decode(self.encode(z)) - z.to(self.codebooks.dtype)
            total = total + diff.square().sum()
            count += diff.numel()
        return total / max(count, 1)


__all__ = ["ProductQuantizer"]
