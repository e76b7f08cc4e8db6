"""Memory passes over a model that knows nothing of them: activation checkpointing whose saved block
inputs may wait in host memory, and sequence tiling of token-wise modules.

- **Checkpointing** (`checkpoint_block`) keeps only each block's input and recomputes the block in
  backward. With ``offload`` that input goes to (pinned) host memory as soon as the block has run and
  comes back when its recompute starts, so the device holds no activation of a checkpointed block
  between its forward and its backward (DeepSpeed ALST's checkpoint offload). On CUDA the copy out
  runs on a side stream, overlapped with the next blocks; the copy back waits for it by an event.
  On CPU the same code path runs (a copy to the same memory), which is what the tests check.
- **Tiling** (`tile_tokens`): a token-wise module (the MLP/SwiGLU: each token's output depends on
  that token alone) runs over tiles of the sequence, each tile checkpointed, so at any time only one
  tile's intermediates (the ``[tokens, hidden]`` activations, 3.5× the model width for SwiGLU) exist,
  in forward and in backward. Exact: the same operations on the same rows.

Both wrap with torch's `checkpoint_wrapper`, whose state-dict hooks keep parameter names unchanged,
so checkpoints move freely between runs with and without these passes.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _ToHost(torch.autograd.Function):
    """A copy of ``x`` in host memory (pinned on CUDA, copied on a side stream); the gradient goes
    back to ``x``'s device."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.device = x.device
        if not x.is_cuda:
            return x.to("cpu", copy=True)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        side = _side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            host.copy_(x, non_blocking=True)
            host.lsts_copied = torch.cuda.Event()
            host.lsts_copied.record(side)
        x.record_stream(side)  # the allocator must not reuse x's memory before the copy has read it
        return host

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(ctx.device, non_blocking=True)


class _ToDevice(torch.autograd.Function):
    """The inverse of `_ToHost`: waits for its copy, then brings the tensor back to ``device``."""

    @staticmethod
    def forward(ctx, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return host.to(device, copy=True)
        event = getattr(host, "lsts_copied", None)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to("cpu"), None


def _offloaded_checkpoint(block: nn.Module, x: torch.Tensor, *args, **kwargs):
    """``block(x, *args, **kwargs)`` checkpointed with its input ``x`` kept in host memory."""
    device = x.device

    def run(host, *a, **kw):
        return block(_ToDevice.apply(host, device), *a, **kw)

    return checkpoint(run, _ToHost.apply(x), *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def checkpoint_block(block: nn.Module, offload: bool = False) -> nn.Module:
    """``block`` recomputed in backward from its first argument (the hidden states), which waits in
    host memory when ``offload``."""
    if offload:
        return checkpoint_wrapper(block, checkpoint_fn=_offloaded_checkpoint)
    return checkpoint_wrapper(block, preserve_rng_state=False)


def _tiled(module: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    if x.shape[1] <= tile:
        return module(x)
    tiles = x.split(tile, dim=1)
    return torch.cat([checkpoint(module, t, use_reentrant=False, preserve_rng_state=False) for t in tiles], dim=1)


def tile_tokens(module: nn.Module, tile: int) -> nn.Module:
    """A token-wise ``module`` (``[B, S, d] -> [B, S, d']``, each token on its own) run over tiles of
    ``tile`` tokens along dim 1, one tile's intermediates alive at a time."""
    if tile <= 0:
        raise ValueError(f"the tile must hold at least one token, got {tile}")
    return checkpoint_wrapper(module, checkpoint_fn=functools.partial(_tiled, tile=tile))


__all__ = ["checkpoint_block", "tile_tokens"]
