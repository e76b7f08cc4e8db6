"""Communication as small explicit objects: the ring's asynchronous P2P, all-to-all, and the
start-up agreement check that turns mismatched inputs into errors on every rank instead of hangs."""

from __future__ import annotations

import datetime
import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def init_process_group(backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT, **kwargs) -> None:
    """`torch.distributed.init_process_group` with a timeout, so that any collective mismatch that
    slips past validation surfaces as an error rather than a hang; gloo unless CUDA is available."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


class RingComm:
    """Send to the next rank and receive from the previous one, asynchronously.

    ``send_recv`` posts the pair and returns the receive buffer; ``wait`` completes it. Posting the
    next step's transfer before computing the current block overlaps communication with compute.
    ``messages_sent`` counts sends (the tests check P - 1 per forward)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world
        self.messages_sent = 0
        self._reqs: list = []

    def send_recv(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._reqs:
            raise RuntimeError("RingComm.send_recv called twice without wait()")
        tensor = tensor.contiguous()
        recv = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, group=self.group, group_peer=self.next),
            dist.P2POp(dist.irecv, recv, group=self.group, group_peer=self.prev),
        ]
        self._reqs = dist.batch_isend_irecv(ops)
        self.messages_sent += 1
        return recv

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []


def even_split(n: int, world: int) -> list[int]:
    """``n`` split over ``world`` parts as `torch.tensor_split` does: the first ``n % world`` get one more."""
    return [n // world + (1 if j < n % world else 0) for j in range(world)]


def all_to_all(
    x: torch.Tensor,
    scatter_dim: int,
    gather_dim: int,
    group=None,
    scatter_sizes: list[int] | None = None,
    gather_sizes: list[int] | None = None,
) -> torch.Tensor:
    """Split ``x`` into P parts along ``scatter_dim``, send part j to rank j, and concatenate what
    arrives along ``gather_dim`` in rank order. Differentiable (the backward is the reverse exchange).

    Uneven splits: ``scatter_sizes`` (P ints, the same on every rank) says how many entries of
    ``scatter_dim`` go to each rank; by default the split is even, or as `torch.tensor_split` makes
    it when P does not divide (the first ranks get one more). ``gather_sizes`` (P ints, the same on
    every rank) gives every rank's size of ``gather_dim`` when they differ (by default all equal ours);
    it has no meaning when ``gather_dim == scatter_dim``."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
    scatter_sizes = even_split(x.shape[scatter_dim], world) if scatter_sizes is None else list(scatter_sizes)
    if gather_sizes is not None and gather_dim == scatter_dim:
        raise ValueError("all_to_all: gather_sizes applies when gather_dim differs from scatter_dim; leave it None")
    gather_sizes = [x.shape[gather_dim]] * world if gather_sizes is None else list(gather_sizes)
    _check_split_sizes(x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, rank, world)
    if world == 1:
        return x
    # Scattered dim first: part j is then one contiguous slab. Rank j's parts differ from ours
    # only in the size of gather_dim, so one flat all_to_all_single with element counts serves
    # every shape; the functional collective is PyTorch's differentiable one (the older
    # torch.distributed.nn one is deprecated) and wait_tensor makes its async result usable.
    slabs = x.movedim(scatter_dim, 0).contiguous()
    rest = list(slabs.shape[1:])
    gather_at = gather_dim if gather_dim < scatter_dim else gather_dim - 1  # its index in ``rest``
    shapes = [rest if gather_dim == scatter_dim else _with(rest, gather_at, gather_sizes[j]) for j in range(world)]
    send = [scatter_sizes[j] * math.prod(rest) for j in range(world)]
    recv_counts = [scatter_sizes[rank] * math.prod(shape) for shape in shapes]
    group = group or dist.group.WORLD
    recv = funcol.wait_tensor(funcol.all_to_all_single_autograd(slabs.reshape(-1), recv_counts, send, group))
    pieces = zip(recv.split(recv_counts), shapes)
    parts = [p.view(scatter_sizes[rank], *shape).movedim(0, scatter_dim) for p, shape in pieces]
    return torch.cat(parts, dim=gather_dim)


def _with(shape: list[int], dim: int, size: int) -> list[int]:
    return [size if i == dim else s for i, s in enumerate(shape)]


def _check_split_sizes(x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, rank, world) -> None:
    if len(scatter_sizes) != world or any(s < 0 for s in scatter_sizes) or sum(scatter_sizes) != x.shape[scatter_dim]:
        raise ValueError(
            f"all_to_all: scatter_sizes {scatter_sizes} must be {world} non-negative sizes (one per rank) summing to "
            f"the size of dim {scatter_dim} ({x.shape[scatter_dim]})"
        )
    if len(gather_sizes) != world or any(s < 0 for s in gather_sizes) or gather_sizes[rank] != x.shape[gather_dim]:
        raise ValueError(
            f"all_to_all: gather_sizes {gather_sizes} must be {world} non-negative sizes, every rank's size of dim "
            f"{gather_dim}; this rank ({rank}) has {x.shape[gather_dim]}"
        )


# Codes for the agreement check: inputs that must match on every rank of a group.
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def encode_dtype(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def decode_dtype(code: int) -> str:
    return str(_DTYPES[code]) if code < len(_DTYPES) else "another dtype"


def agree_across_ranks(group, fields: dict[str, int], local_error: str | None, decode: dict | None = None) -> None:
    """Check on every rank, with one small all-gather, that ``fields`` agree across the group and no
    rank saw a local error; raise the same `ValueError` on every rank otherwise.

    Every rank must call this before the first data collective, even a rank whose inputs failed a
    local check (pass the message as ``local_error``): raising early on one rank would leave the
    others waiting in a collective. ``decode`` maps a field name to a function that renders its
    integer code in the message."""
    world = dist.get_world_size(group)
    names = list(fields)
    row = torch.tensor([int(local_error is not None)] + [fields[n] for n in names], dtype=torch.int64)
    if world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        table = torch.empty(world * row.numel(), dtype=torch.int64, device=device)
        dist.all_gather_single(table, row.to(device), group=group)
        table = table.cpu().view(world, row.numel())
    else:
        table = row.unsqueeze(0)
    if local_error is not None:
        raise ValueError(local_error)
    bad = [r for r in range(world) if table[r, 0]]
    if bad:
        raise ValueError(f"invalid attention inputs on rank(s) {bad} of this group (see their error)")
    for j, name in enumerate(names, start=1):
        values = table[:, j].tolist()
        if len(set(values)) > 1:
            show = (decode or {}).get(name, str)
            per_rank = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
            raise ValueError(f"{name} must be the same on every rank of the group; got {per_rank}")
