"""Sequence parallelism: shard the sequence across ranks, attend across shards.

Process groups are arguments, never globals. Every attention here takes this rank's shard
``[B, S_local, H, D]`` under a layout made by `shard_sequence` and returns this rank's output.
"""

from lsts.parallel.comm import RingComm, all_to_all, init_process_group
from lsts.parallel.hybrid import hybrid_attention
from lsts.parallel.ring import ring_attention
from lsts.parallel.rsa import rsa_attention
from lsts.parallel.sharding import (
    DOCUMENT_LAYOUTS,
    LAYOUTS,
    gather_sequence,
    layout_indices,
    ring_tiles,
    seq_len_divisor,
    sequence_positions,
    shard_sequence,
)
from lsts.parallel.ulysses import ulysses_attention

__all__ = [
    "DOCUMENT_LAYOUTS",
    "LAYOUTS",
    "RingComm",
    "all_to_all",
    "gather_sequence",
    "hybrid_attention",
    "init_process_group",
    "layout_indices",
    "ring_attention",
    "ring_tiles",
    "rsa_attention",
    "seq_len_divisor",
    "sequence_positions",
    "shard_sequence",
    "ulysses_attention",
]
