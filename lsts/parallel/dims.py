"""Parallel degrees of a run and the one named DeviceMesh built from them.

``world = pp · dp_replicate · dp_shard · cp_ring · cp_ulysses · tp``. The mesh has one named axis
per degree, outermost first: ``pp`` (stages talk least), then data parallelism, then context
parallelism, and ``tp`` innermost (it talks most, so its ranks are neighbours, as in torchtitan).
Flattened axes serve the engines: ``dp`` (the batch split), ``cp`` (the ranks that share one
sequence), ``dp_shard_cp`` (what FSDP shards parameters over: context-parallel ranks hold identical
weights, so they shard them too) and ``dp_cp`` (every rank with the same weights: gradient
reduction and the token count of the loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lsts.parallel.sharding import check_seq_len

AXES = ("pp", "dp_replicate", "dp_shard", "cp_ring", "cp_ulysses", "tp")
FLATTENED = {
    "dp": ("dp_replicate", "dp_shard"),
    "cp": ("cp_ring", "cp_ulysses"),
    "dp_shard_cp": ("dp_shard", "cp_ring", "cp_ulysses"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp_ring", "cp_ulysses"),
}


@dataclass(frozen=True)
class ParallelMesh:
    """The named DeviceMesh and its flattened axes, looked up by name alike: ``mesh["cp_ring"]``,
    ``mesh["dp_cp"]`` (torch keeps flattened meshes apart from the root; slicing them out of the
    root again is deprecated)."""

    root: DeviceMesh
    flat: dict[str, DeviceMesh]

    def __getitem__(self, names: str | tuple[str, ...]) -> DeviceMesh:
        if isinstance(names, str) and names in self.flat:
            return self.flat[names]
        return self.root[names]


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp_ring: int = 1
    cp_ulysses: int = 1

    @classmethod
    def from_config(cls, cfg, world_size: int) -> ParallelDims:
        """From a `lsts.config.ParallelConfig`, with the degree set to -1 filling the rest of the world."""
        r = cfg.resolved(world_size)
        return cls(r.dp_replicate, r.dp_shard, r.tp, r.pp, r.cp_ring, r.cp_ulysses)

    @property
    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def world_size(self) -> int:
        n = 1
        for d in self.degrees.values():
            n *= d
        return n

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def cp(self) -> int:
        return self.cp_ring * self.cp_ulysses

    def validate(self, world_size: int) -> None:
        """ValueError naming the degrees and the fix; call on every rank before any collective."""
        bad = {k: v for k, v in self.degrees.items() if v < 1}
        if bad:
            raise ValueError(f"parallel degrees must be >= 1, got {bad}")
        if self.world_size != world_size:
            product = " x ".join(f"{k}={v}" for k, v in self.degrees.items() if v > 1) or "1"
            raise ValueError(
                f"the parallel degrees multiply to {self.world_size} ({product}) but the world has {world_size} "
                f"ranks; launch {self.world_size} processes or change the degrees (parallel.dp_shard=-1 fills the rest)"
            )

    def check_model(self, n_heads: int, n_kv_heads: int) -> None:
        """Heads must split evenly over tp, then the remaining heads of a rank over cp_ulysses (any
        split, at least one head per rank)."""
        if n_heads % self.tp or n_kv_heads % self.tp:
            raise ValueError(
                f"tensor parallelism splits heads: n_heads ({n_heads}) and n_kv_heads ({n_kv_heads}) must be "
                f"divisible by parallel.tp ({self.tp})"
            )
        if n_heads // self.tp < self.cp_ulysses:  # uneven splits are fine; an empty one is not
            raise ValueError(
                f"Ulysses splits the {n_heads // self.tp} heads of a tensor-parallel rank over parallel.cp_ulysses "
                f"({self.cp_ulysses}), more ranks than heads; lower cp_ulysses and raise cp_ring"
            )

    def check_seq_len(self, seq_len: int, layout: str) -> None:
        check_seq_len(seq_len, layout, self.cp)

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The named mesh over every axis (size-1 axes included, so names never depend on the run),
        plus the flattened axes (see the module docstring)."""
        mesh = init_device_mesh(device_type, tuple(self.degrees.values()), mesh_dim_names=AXES)
        flat = {name: mesh[axes]._flatten(name) for name, axes in FLATTENED.items()}
        return ParallelMesh(mesh, flat)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


__all__ = ["AXES", "FLATTENED", "ParallelDims", "ParallelMesh"]
