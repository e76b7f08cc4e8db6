"""Test session set-up. Triton decides at kernel-definition time whether a kernel is compiled or
interpreted, so on a machine without CUDA the interpreter is switched on here, before any test
imports lsts: every Triton kernel then runs on CPU tensors (small shapes, fp32/fp16). Kernel output
buffers start as NaN in the tests (`lsts.kernels.buffers`), so an element left unwritten fails."""

import logging
import os

import pytest
import torch

os.environ.setdefault("LSTS_POISON_BUFFERS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_lsts_logging():
    """A launcher run in the test process configures the ``lsts`` logger (own handler, no
    propagation); later tests capture its records through the root logger, so each test gets it back
    as it found it."""
    logger = logging.getLogger("lsts")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A test that leaves a default process group in this process changes what every later
    in-process test sees (``shard_sequence`` without a group shards over it): fail that test."""
    import torch.distributed as dist

    yield
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        dist.destroy_process_group()
        pytest.fail(f"the test left a {backend!r} default process group initialized in the test process")
