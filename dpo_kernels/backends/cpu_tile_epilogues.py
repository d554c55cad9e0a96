"""Launchers of the C++ CPU tile epilogues of the linear path (dpo_kernels._C,
csrc/cpu/tile_epilogues.cpp); the contract is dpo_kernels/backends/tile_epilogue.py.

`fold_tile` reads the tile once (each row in L1-sized pieces) and writes only the `[rows]` running
statistics of `stats`; `tile_logits_grad_` reads each tile row once and overwrites it in place with
its gradient (rows with zero gradients are only written, as zeros). The transformed logits
z = transform(y), the probabilities and everything else per element live in registers or in an
L1-sized per-thread buffer: nothing tile-sized is allocated or materialised. Rows run on
`torch.get_num_threads()` OpenMP threads; results do not depend on the thread count.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import extension
from .tile_epilogue import LogitTransform, TileStats, check_row_operand, check_tile


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t: Optional[torch.Tensor], name: str, shape, acc: torch.dtype) -> int:
    """data_ptr() of a small per-row operand after checking what the kernel assumes (0 for None)."""
    check_row_operand(name, t, shape, acc, torch.device("cpu"))
    return 0 if t is None else t.data_ptr()


def _tile_args(tile: torch.Tensor, targets: torch.Tensor, v0: int):
    check_tile(tile, targets)
    if tile.device.type != "cpu" or targets.device.type != "cpu":
        raise ValueError(f"the CPU tile epilogues take CPU tensors, got tile on {tile.device}, "
                         f"targets on {targets.device}")
    rows, chunk = tile.shape
    return (tile.data_ptr(), extension.dtype_code(tile.dtype), rows, chunk, tile.stride(0), int(v0),
            targets.data_ptr())


def fold_tile(tile: torch.Tensor, v0: int, targets: torch.Tensor, stats: TileStats,
              transform: LogitTransform) -> None:
    """Merges the tile's rows of z = transform(tile) into `stats` (in place; see TileStats)."""
    rows = tile.shape[0]
    acc = _acc_dtype(tile.dtype)
    shape = (rows,)
    extension.load().cpu_tile_fold_stats(
        *_tile_args(tile, targets, v0),
        _ptr(stats.max, "stats.max", shape, acc), _ptr(stats.sum_exp, "stats.sum_exp", shape, acc),
        _ptr(stats.target_logit, "stats.target_logit", shape, acc),
        _ptr(stats.centered, "stats.centered", shape, acc), _ptr(stats.sum_sq, "stats.sum_sq", shape, acc),
        _ptr(stats.sum_logits, "stats.sum_logits", shape, acc),
        _ptr(stats.max_before_target, "stats.max_before_target", shape, acc),
        _ptr(stats.max_after_target, "stats.max_after_target", shape, acc),
        float(transform.pre_scale), float(transform.softcap), float(transform.post_scale), torch.get_num_threads(),
    )


def tile_logits_grad_(tile: torch.Tensor, v0: int, targets: torch.Tensor, row_stats: torch.Tensor,
                      grad: torch.Tensor, transform: LogitTransform, entropy_grad: Optional[torch.Tensor] = None,
                      entropy: Optional[torch.Tensor] = None) -> None:
    """Overwrites the tile, in place, with the gradient w.r.t. y (see the contract's formula)."""
    if (entropy_grad is None) != (entropy is None):
        raise ValueError("entropy_grad and entropy must be given together")
    rows = tile.shape[0]
    acc = _acc_dtype(tile.dtype)
    extension.load().cpu_tile_logits_grad(
        *_tile_args(tile, targets, v0),
        _ptr(row_stats, "row_stats", (rows, 2), acc), _ptr(grad, "grad", (rows,), acc),
        _ptr(entropy_grad, "entropy_grad", (rows,), acc), _ptr(entropy, "entropy", (rows,), acc),
        float(transform.pre_scale), float(transform.softcap), float(transform.post_scale), torch.get_num_threads(),
    )
