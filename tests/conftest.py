"""Test session set-up. Triton decides at kernel-definition time whether a kernel is compiled or
interpreted, so on a machine without CUDA the interpreter is switched on here, before any test
imports lsts: every Triton kernel then runs on CPU tensors (small shapes, fp32/fp16)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
