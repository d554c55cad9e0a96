"""Test configuration of dpo_kernels.

Without a CUDA device the Triton kernels can still be tested: under TRITON_INTERPRET=1 they run on
CPU tensors in Triton's interpreter. The variable must be set before any Triton kernel is defined
(`dpo_kernels.backends.triton_token_logps` is imported lazily, on first use, so setting it here,
before any test module runs, is early enough). With a CUDA device the Triton kernels run compiled
on CUDA tensors instead, and the interpreter stays off unless the caller set it.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated here so that the suite runs from any rootdir.
    config.addinivalue_line("markers", "slow: large tests (GiBs of memory); deselect with -m 'not slow'")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
