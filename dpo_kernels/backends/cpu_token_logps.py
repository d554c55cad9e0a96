"""Launchers of the C++ CPU kernels of the logits path (dpo_kernels._C, csrc/cpu/token_logps.cpp);
the contract is in token_logps_launch.py.

Forward reads each unmasked logits row once and allocates only `[S, T]`-sized outputs; backward
writes the gradient into the buffer it is given (fresh, or the logits themselves). Rows run on
`torch.get_num_threads()` OpenMP threads.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import extension
from .token_logps_launch import ForwardBuffers, pointer, row_arguments, run_backward, run_forward


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, extras: bool = False):
    def launch(out: ForwardBuffers) -> None:
        extension.load().cpu_token_logps_forward(
            *row_arguments(logits, targets, ignore_index), pointer(out.token_logps), pointer(out.row_stats),
            pointer(out.stats), torch.get_num_threads(),
        )

    return run_forward(logits, extras, launch)


def backward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, row_stats: torch.Tensor,
             grad: torch.Tensor, out: torch.Tensor, entropy_grad: Optional[torch.Tensor] = None,
             entropy: Optional[torch.Tensor] = None) -> None:
    """A fresh `out` is first advised onto huge pages (see csrc/cpu/huge_pages.h): its page faults
    would otherwise cost more than the kernel."""

    def launch() -> None:
        ext = extension.load()
        if out is not logits:
            ext.cpu_advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
        ext.cpu_token_logps_backward(
            *row_arguments(logits, targets, ignore_index), row_stats.data_ptr(), grad.data_ptr(),
            pointer(entropy_grad), pointer(entropy), out.data_ptr(), out.stride(0), out.stride(1),
            torch.get_num_threads(),
        )

    run_backward(logits, launch)
