"""The multi-process harness itself: results come back in rank order, failures carry tracebacks."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed import RankError, run_ranks


def _rank_sum(rank, world):
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    return rank, world, x.item()


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise KeyError("only rank 1 breaks")
    dist.barrier()  # rank 0 hangs here: the harness must still return


def _die_on_rank_1(rank, world):
    if rank == 1:
        os._exit(3)
    return rank


def test_results_in_rank_order():
    assert run_ranks(_rank_sum, 3) == [(0, 3, 3.0), (1, 3, 3.0), (2, 3, 3.0)]


def test_a_rank_failure_is_raised_with_its_traceback():
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 raised KeyError.*only rank 1 breaks.*_fail_on_rank_1"):
        run_ranks(_fail_on_rank_1, 2)


def test_a_rank_that_dies_is_reported():
    with pytest.raises(RankError, match="rank 1 of 2 raised ProcessDied: exit code 3"):
        run_ranks(_die_on_rank_1, 2)
