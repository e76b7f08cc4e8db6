"""Layouts as index maps, and the ring tiles that skip exactly the masked work."""

import pytest
import torch

from lsts.parallel import LAYOUTS, layout_indices, ring_tiles, seq_len_divisor, shard_sequence
from lsts.parallel.sharding import DOCUMENT_LAYOUTS

# The layouts that cut the whole pack the same whatever its documents (balanced: tests/test_balanced.py).
WHOLE_PACK = [layout for layout in LAYOUTS if layout not in DOCUMENT_LAYOUTS]


@pytest.mark.parametrize("layout", WHOLE_PACK)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layouts_partition_the_sequence(layout, world):
    n = 2 * world * 7
    parts = [layout_indices(n, world, r, layout) for r in range(world)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(n))
    assert all(len(p) == n // world for p in parts)
    for p in parts:  # ascending within a shard: the local causal mask is the global one
        assert torch.equal(p, torch.sort(p).values)


def test_zigzag_holds_chunk_r_and_its_mirror():
    assert layout_indices(16, 2, 0, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert layout_indices(16, 2, 1, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert layout_indices(6, 3, 1, "stripe").tolist() == [1, 4]


def _tile_mask(layout, rank, src, world, s, causal):
    mask = torch.zeros(s, s, dtype=torch.bool)
    for t in ring_tiles(layout, rank, src, world, s, causal):
        block = torch.ones(t.q.stop - t.q.start, t.k.stop - t.k.start, dtype=torch.bool)
        assert not mask[t.q, t.k].any(), "tiles overlap"
        mask[t.q, t.k] = block.tril() if t.causal else block
    return mask


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", WHOLE_PACK)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_tiles_cover_exactly_the_unmasked_pairs(layout, world, causal):
    n = seq_len_divisor(layout, world) * 5
    s = n // world
    pos = [layout_indices(n, world, r, layout) for r in range(world)]
    for rank in range(world):
        for src in range(world):
            want = pos[src][None, :] <= pos[rank][:, None] if causal else torch.ones(s, s, dtype=torch.bool)
            assert torch.equal(_tile_mask(layout, rank, src, world, s, causal), want), (rank, src)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zigzag_gives_every_rank_the_same_work_at_every_step(world):
    s = 2 * 37  # two odd chunks of 37 tokens
    for step in range(world):
        areas = {
            sum(t.area() for t in ring_tiles("zigzag", r, (r - step) % world, world, s, True)) for r in range(world)
        }
        assert len(areas) == 1, f"step {step}: unequal work {areas}"
    contiguous = [
        sum(t.area() for src in range(world) for t in ring_tiles("contiguous", r, src, world, s, True))
        for r in range(world)
    ]
    assert contiguous[0] < contiguous[-1]  # the imbalance zigzag removes


def test_bad_length_names_the_fix():
    with pytest.raises(
        ValueError,
        match=r"sequence length 30 .* 'zigzag' over 4 ranks: it must be a multiple of 8; pad or cut it to 24 or 32",
    ):
        layout_indices(30, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="unknown sequence layout 'spiral'"):
        layout_indices(8, 2, 0, "spiral")


def test_shard_without_process_group_is_identity():
    x = torch.randn(2, 10, 3)
    assert torch.equal(shard_sequence(x, layout="zigzag"), x)
