"""Launchers of the C++ CPU kernels of the logits path (dpo_kernels._C, csrc/cpu/token_logps.cpp).

Forward reads each unmasked logits row once and allocates only `[S, T]` outputs; backward writes
the gradient into the buffer it is given (fresh, or the logits themselves). Rows run on
`torch.get_num_threads()` OpenMP threads.
"""

from __future__ import annotations

import torch

from . import extension


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """token_logps `[S, T]` and row_stats `[S, T, 2]` (row max, log of the sum of exp(x - max)),
    float64 for float64 logits, else fp32."""
    S, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    token_logps = torch.empty((S, T), dtype=acc)
    row_stats = torch.empty((S, T, 2), dtype=acc)
    extension.load().cpu_token_logps_forward(
        logits.data_ptr(), extension.dtype_code(logits.dtype), S, T, V, logits.stride(0), logits.stride(1),
        targets.data_ptr(), ignore_index, token_logps.data_ptr(), row_stats.data_ptr(), torch.get_num_threads(),
    )
    return token_logps, row_stats


def backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    row_stats: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Writes the logits gradient into `out` (may be `logits`). `row_stats` (from `forward`) and
    `grad` (`[S, T]`) are contiguous in the accumulation dtype. A fresh `out` is first advised onto huge pages (see
    csrc/cpu/huge_pages.h): its page faults would otherwise cost more than the kernel."""
    S, T, V = logits.shape
    ext = extension.load()
    if out is not logits:
        ext.cpu_advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    ext.cpu_token_logps_backward(
        logits.data_ptr(), extension.dtype_code(logits.dtype), S, T, V, logits.stride(0), logits.stride(1),
        targets.data_ptr(), ignore_index, row_stats.data_ptr(), grad.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads(),
    )
