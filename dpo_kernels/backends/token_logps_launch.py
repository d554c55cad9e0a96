"""What the three logits-path launchers (cpu_, triton_, cuda_token_logps.py) share: the contract,
the output buffers, the empty-input rule and the C++ kernels' row arguments. Each launcher adds
only its kernel call.

Every launcher module provides

    forward(logits, targets, ignore_index, extras=False)
        extras False -> (token_logps [S, T], row_stats [S, T, 2]): the token log-probs and each
                        row's pair (max, log of the sum of exp(x - max)); 0s where masked.
        extras True  -> stats [S, T, 8]: the linear path's TileStats fields over the whole row, in
                        STATS_FIELDS order (masked rows: the empty set's values), from the same
                        single pass over each row; the caller finishes them (finish_stats).
    backward(logits, targets, ignore_index, row_stats, grad, out, entropy_grad=None, entropy=None)
        writes g * (onehot - p) - ge * p * (log p + H) into `out` (shaped like the logits, unit
        stride over V; may be the logits themselves), ge = entropy_grad, H = entropy when given.

`logits` `[S, T, V]` (unit stride over V, any row strides), `targets` int64 contiguous `[S, T]`
aligned with the rows (ignore_index: masked, never read). Outputs and the per-row inputs
(row_stats, grad, entropy_grad, entropy) are contiguous in the accumulation dtype: fp32, float64
for float64 logits (CPU only). Nothing `[S, T, V]`-sized is allocated here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from . import extension
from .tile_epilogue import STATS_FIELDS


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ForwardBuffers(NamedTuple):
    """The forward's outputs: token_logps and row_stats (plain), or stats (extras); others None."""

    token_logps: Optional[torch.Tensor]
    row_stats: Optional[torch.Tensor]
    stats: Optional[torch.Tensor]


def run_forward(logits: torch.Tensor, extras: bool, launch: Callable[[ForwardBuffers], None]):
    """Allocates the forward's outputs, calls `launch(buffers)` unless there is no row, and returns
    what `forward` returns (see the module docstring)."""
    S, T, _ = logits.shape
    acc = acc_dtype(logits.dtype)

    def empty(*shape):
        return torch.empty(shape, dtype=acc, device=logits.device)

    if extras:
        buffers = ForwardBuffers(None, None, empty(S, T, len(STATS_FIELDS)))
    else:
        buffers = ForwardBuffers(empty(S, T), empty(S, T, 2), None)
    if S * T > 0:
        launch(buffers)
    return buffers.stats if extras else (buffers.token_logps, buffers.row_stats)


def run_backward(logits: torch.Tensor, launch: Callable[[], None]) -> None:
    """Calls `launch()` unless the logits are empty (nothing to write)."""
    S, T, V = logits.shape
    if S * T > 0 and V > 0:
        launch()


def pointer(t: Optional[torch.Tensor]) -> int:
    """A tensor's address for the C++ kernels; 0 (nullptr: not given) for None."""
    return 0 if t is None else t.data_ptr()


def row_arguments(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple:
    """The C++ kernels' TokenRows (csrc/common/token_rows.h), as their bindings take it:
    (logits, dtype, S, T, V, stride_s, stride_t, targets, ignore_index)."""
    S, T, V = logits.shape
    return (logits.data_ptr(), extension.dtype_code(logits.dtype), S, T, V, logits.stride(0), logits.stride(1),
            targets.data_ptr(), ignore_index)
