"""The memory passes (`lsts.parallel.memory`) compute exactly what the plain modules compute, keep
parameter names, and save less for backward."""

import torch
from torch import nn

from lsts.models.masformer import FeedForward
from lsts.parallel.memory import checkpoint_block, tile_tokens
from tests.oracle import rel_err


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs its forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def _grads(module, x, out):
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    return torch.autograd.grad((out * w).sum(), (x, *module.parameters()))


def test_tiled_feed_forward_is_exact_and_saves_one_tile():
    torch.manual_seed(0)
    ff = FeedForward(16, 56).double()
    tiled = tile_tokens(ff, 10)  # 37 tokens: tiles of 10, 10, 10, 7
    x = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    want, plain_bytes = _saved_bytes(lambda: ff(x))
    got, tiled_bytes = _saved_bytes(lambda: tiled(x))
    assert rel_err(got, want) < 1e-12
    for g, h in zip(_grads(tiled, x, got), _grads(ff, x, want)):
        assert rel_err(g, h) < 1e-12
    assert tiled_bytes < plain_bytes / 3  # the [tokens, hidden] intermediates are never kept
    assert tiled.state_dict().keys() == ff.state_dict().keys()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.ff = nn.LayerNorm(16), FeedForward(16, 40)

    def forward(self, x, scale: float):
        return x + scale * self.ff(self.norm(x))


def test_offloaded_checkpoint_is_exact_and_keeps_names():
    torch.manual_seed(0)
    block = _Block().double()
    wrapped = checkpoint_block(block, offload=True)
    x = torch.randn(2, 23, 16, dtype=torch.float64, requires_grad=True)
    got, want = wrapped(x, scale=0.5), block(x, 0.5)
    assert rel_err(got, want) < 1e-12
    for g, h in zip(_grads(wrapped, x, got), _grads(block, x, want)):
        assert rel_err(g, h) < 1e-12
    assert wrapped.state_dict().keys() == block.state_dict().keys()


def test_offload_nests_with_tiles():
    torch.manual_seed(0)
    block = _Block().double()
    plain = _Block().double()
    plain.load_state_dict(block.state_dict())
    block.ff = tile_tokens(block.ff, 8)
    wrapped = checkpoint_block(block, offload=True)
    x = torch.randn(1, 30, 16, dtype=torch.float64, requires_grad=True)
    got, want = wrapped(x, 1.0), plain(x, 1.0)
    assert rel_err(got, want) < 1e-12
    for g, h in zip(_grads(wrapped, x, got), _grads(plain, x, want)):
        assert rel_err(g, h) < 1e-12
