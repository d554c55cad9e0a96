"""Launchers of the CUDA C++ kernels of the logits path (dpo_kernels._C, csrc/cuda/token_logps_*.cu);
the contract is in token_logps_launch.py.

Forward reads each unmasked logits row once (16-byte loads, online log-sum-exp in fp32; with
extras the softmax moments and the top-1 maxima in the same pass) and allocates only fp32
per-token outputs. The row's log-sum-exp travels as the pair `(m, log_sum)` (its max,
`log(sum(exp(x - m)))`), never as one fp32 number, which would lose ~6e-4 at logits of 1e4.
Backward computes `exp((x - m) - log_sum)` from the pair and writes the gradient into the buffer
it is given (fresh, or the logits themselves), reading and writing each element once. Kernels are
enqueued on the current CUDA stream of the logits' device; nothing synchronises. `kernels` picks
where they run (cuda_kernels.py: the GPU, or the host emulation for CPU tensors, which
`cuda_emulated_token_logps.py` binds).
"""

from __future__ import annotations

from typing import Optional

import torch

from .cuda_kernels import GPU, CudaKernels
from .token_logps_launch import ForwardBuffers, pointer, row_arguments, run_backward, run_forward


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, extras: bool = False,
            kernels: CudaKernels = GPU):
    def launch(out: ForwardBuffers) -> None:
        with kernels.on_device(logits.device):
            kernels.entry("token_logps_forward")(
                *row_arguments(logits, targets, ignore_index), pointer(out.token_logps), pointer(out.row_stats),
                pointer(out.stats), kernels.stream(logits.device),
            )

    return run_forward(logits, extras, launch)


def backward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, row_stats: torch.Tensor,
             grad: torch.Tensor, out: torch.Tensor, entropy_grad: Optional[torch.Tensor] = None,
             entropy: Optional[torch.Tensor] = None, kernels: CudaKernels = GPU) -> None:
    def launch() -> None:
        with kernels.on_device(logits.device):
            kernels.entry("token_logps_backward")(
                *row_arguments(logits, targets, ignore_index), row_stats.data_ptr(), grad.data_ptr(),
                pointer(entropy_grad), pointer(entropy), out.data_ptr(), out.stride(0), out.stride(1),
                kernels.stream(logits.device),
            )

    run_backward(logits, launch)
