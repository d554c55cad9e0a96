"""The logits path's CUDA C++ kernels run on CPU tensors by their host emulation (backend
"cuda_emulated", for tests): the launchers of `cuda_token_logps.py` bound to the emulated entry
points (cuda_kernels.EMULATED). Slow (a block's threads are fibers); never chosen by "auto"."""

from __future__ import annotations

import functools

from . import cuda_token_logps
from .cuda_kernels import EMULATED

forward = functools.partial(cuda_token_logps.forward, kernels=EMULATED)
backward = functools.partial(cuda_token_logps.backward, kernels=EMULATED)
