"""The linear path's CUDA C++ tile epilogues run on CPU tensors by their host emulation (backend
"cuda_emulated", for tests): the launchers of `cuda_tile_epilogues.py` bound to the emulated entry
points (cuda_kernels.EMULATED). Slow (a block's threads are fibers); never chosen by "auto"."""

from __future__ import annotations

import functools

from . import cuda_tile_epilogues
from .cuda_kernels import EMULATED

fold_tile = functools.partial(cuda_tile_epilogues.fold_tile, kernels=EMULATED)
tile_logits_grad_ = functools.partial(cuda_tile_epilogues.tile_logits_grad_, kernels=EMULATED)
