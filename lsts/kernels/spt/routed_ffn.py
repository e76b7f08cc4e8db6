"""SPT routed FFN (``docs/algorithms.md`` §8): the FFN's hidden units in ``E`` blocks (4), a sigmoid router
picks the top-``k`` blocks (2) per token, tokens are batched per block, and each block's output is
scaled by ``2·p`` (``p`` the router's sigmoid for that block) so the router receives a gradient.

For a token ``x`` with chosen blocks ``e``: ``y = Σ_e 2·p_e · W_down[:, e] act(W_gate[e] x) ⊙ (W_up[e] x)``
(SwiGLU), or ``y = Σ_e 2·p_e · W_down[:, e] act(W_up[e] x + b_up[e]) + b_down`` (a GELU fc1/fc2 MLP;
the output bias is added once, unscaled). The factor 2 makes the scale 1 for an undecided router
(``p = 1/2``), so the pretrained FFN's blocks start at their own magnitude. Weights keep the
`torch.nn.Linear` layout (``W_up [h, d]``, ``W_down [d, h]``); block ``e`` is hidden units
``[e·h/E, (e+1)·h/E)``, so a pretrained FFN is used as it is.

Backends (`lsts.kernels.backend`): ``torch`` (the CPU twin: one ``index_select`` puts the tokens
in block order, three matmuls per block on its rows, one ``index_add_`` scatters the scaled results
back; autograd does the backward), ``triton`` (the same data flow with `spt.triton.grouped_mm`: one
launch per projection for all blocks, its backward a grouped GEMM for the data gradient and a
grouped weight-gradient kernel), ``reference`` (the dense FFN with the per-token ``[T, h]`` block
mask: the oracle of the tests). Work is ``k/E`` of the dense FFN's (half at top-2 of 4) plus the
routing.

Limits: the router is a plain linear map; there is no load-balancing loss (SPT uses none); a block
chosen by no token costs nothing and gets a zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsts.kernels.backend import resolve_backend

_SUPPORTED = ("triton", "torch", "reference")
ROUTER_SCALE = 2.0  # the 2 of "2·p": scale 1 at p = 1/2


@dataclass
class Routing:
    """Assignments of tokens to blocks, sorted by block: ``top [T, k]`` the chosen blocks,
    ``probs [T, E]`` the router's sigmoids, ``src [T·k]`` token of each sorted row,
    ``offsets`` (host ints, ``E + 1``) where each
    block's rows start, and the per-row output scale ``scale [T·k]`` (differentiable)."""

    top: torch.Tensor
    probs: torch.Tensor
    src: torch.Tensor
    offsets: list[int]
    scale: torch.Tensor


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Top-``k`` blocks of ``sigmoid(logits [T, E])`` per token, grouped by block (ties: lower block)."""
    n_blocks = logits.shape[1]
    if not 1 <= top_k <= n_blocks:
        raise ValueError(f"top_k must be in [1, {n_blocks}] (the number of blocks), got {top_k}")
    p = torch.sigmoid(logits)
    top = logits.detach().topk(top_k, dim=-1).indices  # [T, k]
    flat = top.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_blocks)
    offsets = [0, *torch.cumsum(counts, 0).tolist()]  # one host sync: each block's row count
    scale = (ROUTER_SCALE * p.gather(1, top)).flatten()[order]
    return Routing(top, p, order // top_k, offsets, scale)


def _block(w: torch.Tensor | None, e: int, n_blocks: int, dim: int) -> torch.Tensor | None:
    if w is None:
        return None
    size = w.shape[dim] // n_blocks
    return w.narrow(dim, e * size, size)


def _check(x, w_up, w_down, w_gate, n_blocks: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, d], got {tuple(x.shape)}")
    h, d = w_up.shape
    if x.shape[1] != d or w_down.shape != (d, h) or (w_gate is not None and w_gate.shape != (h, d)):
        raise ValueError(
            f"FFN shapes do not agree: x {tuple(x.shape)}, up {tuple(w_up.shape)}, down {tuple(w_down.shape)}, "
            f"gate {None if w_gate is None else tuple(w_gate.shape)}"
        )
    if h % n_blocks:
        raise ValueError(f"the FFN's {h} hidden units do not split into {n_blocks} equal blocks")


def _ffn_torch(x, routing: Routing, w_up, w_down, act, w_gate, b_up, n_blocks: int) -> torch.Tensor:
    xs = x.index_select(0, routing.src)  # every block's tokens, block after block: one gather
    scale = routing.scale[:, None].to(x.dtype)
    ys = []
    for e in range(n_blocks):
        lo, hi = routing.offsets[e], routing.offsets[e + 1]
        if lo == hi:
            continue
        x_e, up_e = xs[lo:hi], _block(w_up, e, n_blocks, 0)
        if w_gate is None:
            hid = act(torch.nn.functional.linear(x_e, up_e, _block(b_up, e, n_blocks, 0)))
        else:  # gate and up of the block in one GEMM
            gate, up = (x_e @ torch.cat([_block(w_gate, e, n_blocks, 0), up_e]).T).chunk(2, dim=1)
            hid = act(gate) * (up if b_up is None else up + _block(b_up, e, n_blocks, 0))
        # 2·p scales the (narrower) hidden block rather than the output rows.
        ys.append((hid * scale[lo:hi]) @ _block(w_down, e, n_blocks, 1).T)
    return torch.zeros_like(x).index_add_(0, routing.src, torch.cat(ys))  # one scatter back to the tokens


def _ffn_triton(x, routing: Routing, w_up, w_down, act, w_gate, b_up, n_blocks: int) -> torch.Tensor:
    from lsts.kernels.spt.triton import grouped_mm

    h, d = w_up.shape
    hb = h // n_blocks

    def by_block(w):  # a [h, d] Linear weight as E blocks of [d, h/E]
        return w.view(n_blocks, hb, d).transpose(1, 2)

    up = grouped_mm(x, by_block(w_up), routing.src, routing.offsets)
    if b_up is not None:
        block_of_row = torch.repeat_interleave(
            torch.arange(n_blocks, device=x.device), torch.tensor(routing.offsets).diff().to(x.device)
        )
        up = up + b_up.view(n_blocks, hb)[block_of_row]
    hid = act(up) if w_gate is None else act(grouped_mm(x, by_block(w_gate), routing.src, routing.offsets)) * up
    w_down_blocks = w_down.view(d, n_blocks, hb).permute(1, 2, 0)  # [E, h/E, d]
    y = grouped_mm(hid, w_down_blocks, None, routing.offsets) * routing.scale[:, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, routing.src, y)


def routed_ffn_reference(x, routing: Routing, w_up, w_down, act, w_gate=None, b_up=None, n_blocks: int = 4):
    """The dense FFN with each token's hidden units scaled by its block's ``2·p`` (0 if unchosen)."""
    h = w_up.shape[0]
    chosen = ROUTER_SCALE * routing.probs.gather(1, routing.top)
    coef = torch.zeros_like(routing.probs).scatter(1, routing.top, chosen)  # [T, E]
    up = torch.nn.functional.linear(x, w_up, b_up)
    hid = act(up) if w_gate is None else act(x @ w_gate.T) * up
    mask = coef.to(x.dtype).repeat_interleave(h // n_blocks, dim=1)  # [T, h]
    return (hid * mask) @ w_down.T


def routed_ffn(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    n_blocks: int = 4,
    top_k: int = 2,
    backend: str = "auto",
) -> torch.Tensor:
    """The routed FFN of ``x [T, d]`` (any leading dims flattened by the caller) with router logits
    ``[T, E]``; differentiable in ``x``, the logits and every weight. ``w_gate`` None: a GELU-style
    ``act(fc1) -> fc2`` MLP (``w_up`` is fc1, ``w_down`` fc2)."""
    _check(x, w_up, w_down, w_gate, n_blocks)
    if router_logits.shape != (x.shape[0], n_blocks):
        raise ValueError(f"router logits must be [{x.shape[0]}, {n_blocks}], got {tuple(router_logits.shape)}")
    backend = resolve_backend(backend, x.device, "spt routed ffn", _SUPPORTED)
    routing = route(router_logits, top_k)
    fn = {"triton": _ffn_triton, "torch": _ffn_torch, "reference": routed_ffn_reference}[backend]
    out = fn(x, routing, w_up, w_down, act, w_gate, b_up, n_blocks)
    return out if b_down is None else out + b_down


__all__ = ["ROUTER_SCALE", "Routing", "route", "routed_ffn", "routed_ffn_reference"]
