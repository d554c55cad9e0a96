"""Launchers of the CUDA C++ tile epilogues of the linear path (dpo_kernels._C,
csrc/cuda/tile_epilogues.cu); the contract is dpo_kernels/backends/tile_epilogue.py.

`fold_tile` reads each tile row once (16-byte loads, one to sixteen warps a row), forms the logits
z = transform(y) in fp32 registers and merges the row's chunk statistics into the `[rows]` running
statistics of `stats` (one thread per row: no atomics, deterministic). `tile_logits_grad_` reads
and writes each tile element once, in place (grid: tile row x span of the chunk); rows whose
gradient and entropy gradient are both 0 are only written, as zeros. Kernel variants: with or
without the extras (fold), with or without the entropy term (grad), and for the identity, scale-
only and softcap transforms (the identity one has no per-element transform cost). Tiles are
fp32, bf16 or fp16 (float64 tiles are a CPU-backend feature); statistics and per-row inputs are
fp32. Kernels are enqueued on the current CUDA stream of the tile's device; nothing synchronises
and nothing tile-sized is allocated. `kernels` picks where they run (cuda_kernels.py: the GPU, or
the host emulation for CPU tensors, which `cuda_emulated_tile_epilogues.py` binds).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import extension
from .cuda_kernels import GPU, CudaKernels
from .tile_epilogue import LogitTransform, TileStats, check_row_operand, check_tile

_TILE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATS_FIELDS = ("max", "sum_exp", "target_logit", "centered", "sum_sq", "sum_logits", "max_before_target",
                 "max_after_target")


def _tile_args(tile: torch.Tensor, targets: torch.Tensor, v0: int,
               kernels: CudaKernels) -> Tuple[int, int, int, int, int, int, int]:
    """(tile ptr, dtype code, rows, chunk, ld, v0, targets ptr) after the shared and CUDA checks."""
    check_tile(tile, targets)
    if tile.dtype not in _TILE_DTYPES:
        raise ValueError(f"the CUDA tile epilogues take float32, bfloat16 or float16 tiles, got {tile.dtype} "
                         "(float64 tiles are a CPU-backend feature)")
    if tile.device.type != kernels.device_type:
        raise ValueError(f"backend {kernels.backend!r} takes {kernels.device_type} tensors, got a tile on {tile.device}")
    if targets.device != tile.device:
        raise ValueError(f"targets must be on the tile's device {tile.device}, got {targets.device}")
    rows, chunk = tile.shape
    return (tile.data_ptr(), extension.dtype_code(tile.dtype), rows, chunk, tile.stride(0), int(v0),
            targets.data_ptr())


def _ptr(t: Optional[torch.Tensor], name: str, shape: Tuple[int, ...], device: torch.device) -> int:
    """data_ptr() of a small per-row fp32 operand after checking what the kernel assumes (0 for None)."""
    check_row_operand(name, t, shape, torch.float32, device)
    return 0 if t is None else t.data_ptr()


def _transform_args(transform: LogitTransform) -> Tuple[float, float, float]:
    return float(transform.pre_scale), float(transform.softcap), float(transform.post_scale)


def fold_tile(tile: torch.Tensor, v0: int, targets: torch.Tensor, stats: TileStats,
              transform: LogitTransform, kernels: CudaKernels = GPU) -> None:
    """Merges the rows of z = transform(tile) (vocabulary entries [v0, v0 + chunk)) into `stats`, in
    place (see TileStats)."""
    args = _tile_args(tile, targets, v0, kernels)
    rows = tile.shape[0]
    if stats.max is None or stats.sum_exp is None or stats.target_logit is None:
        raise ValueError("stats.max, stats.sum_exp and stats.target_logit are required")
    ptrs = [_ptr(getattr(stats, name), f"stats.{name}", (rows,), tile.device) for name in _STATS_FIELDS]
    with kernels.on_device(tile.device):
        kernels.entry("tile_fold_stats")(*args, *ptrs, *_transform_args(transform), kernels.stream(tile.device))


def tile_logits_grad_(tile: torch.Tensor, v0: int, targets: torch.Tensor, row_stats: torch.Tensor,
                      grad: torch.Tensor, transform: LogitTransform, entropy_grad: Optional[torch.Tensor] = None,
                      entropy: Optional[torch.Tensor] = None, kernels: CudaKernels = GPU) -> None:
    """Overwrites the tile, in place, with the gradient of the loss w.r.t. y (the contract's formula:
    token log-prob term with `grad`, entropy term with `entropy_grad` and `entropy` when given,
    chain rule through `transform`)."""
    if (entropy_grad is None) != (entropy is None):
        raise ValueError("entropy_grad and entropy must be given together")
    args = _tile_args(tile, targets, v0, kernels)
    rows = tile.shape[0]
    device = tile.device
    row_ptrs = (
        _ptr(row_stats, "row_stats", (rows, 2), device), _ptr(grad, "grad", (rows,), device),
        _ptr(entropy_grad, "entropy_grad", (rows,), device), _ptr(entropy, "entropy", (rows,), device),
    )
    with kernels.on_device(device):
        kernels.entry("tile_logits_grad")(*args, *row_ptrs, *_transform_args(transform), kernels.stream(device))
