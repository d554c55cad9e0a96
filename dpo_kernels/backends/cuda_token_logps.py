"""Launchers of the CUDA C++ kernels of the logits path (dpo_kernels._C, csrc/cuda/token_logps_*.cu).

Forward reads each unmasked logits row once (16-byte loads, online log-sum-exp in fp32) and
allocates only the fp32 per-token outputs: `token_logps` `[S, T]` and `row_stats` `[S, T, 2]`, each
row's pair `(m, log_sum)` = (its max, `log(sum(exp(x - m)))`), kept apart rather than as one fp32
log-sum-exp, which would lose ~6e-4 at logits of 1e4. Backward computes `exp((x - m) - log_sum)`
from the pair and writes the gradient into the buffer it is given (fresh, or the logits
themselves), reading and writing each element once. Kernels are enqueued on the current CUDA
stream of the logits' device; nothing synchronises. `kernels` picks where they run (cuda_kernels.py:
the GPU, or the host emulation for CPU tensors, which `cuda_emulated_token_logps.py` binds).
"""

from __future__ import annotations

import torch

from . import extension
from .cuda_kernels import GPU, CudaKernels


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, kernels: CudaKernels = GPU):
    """(token_logps fp32 `[S, T]`, row_stats fp32 contiguous `[S, T, 2]`) on the logits' device, for
    `[S, T, V]` fp32/bf16/fp16 logits (unit stride over V) and int64 contiguous `[S, T]` targets
    already aligned with the logits rows. `row_stats[s, t] = (m, log_sum)`; masked rows get zeros."""
    S, T, V = logits.shape
    token_logps = torch.empty((S, T), dtype=torch.float32, device=logits.device)
    row_stats = torch.empty((S, T, 2), dtype=torch.float32, device=logits.device)
    if S * T == 0:
        return token_logps, row_stats
    with kernels.on_device(logits.device):
        kernels.entry("token_logps_forward")(
            logits.data_ptr(), extension.dtype_code(logits.dtype), S, T, V, logits.stride(0), logits.stride(1),
            targets.data_ptr(), ignore_index, token_logps.data_ptr(), row_stats.data_ptr(),
            kernels.stream(logits.device),
        )
    return token_logps, row_stats


def backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    row_stats: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
    kernels: CudaKernels = GPU,
) -> None:
    """Writes the logits gradient into `out` (shaped like the logits, unit stride over V; may be
    the logits themselves). `row_stats`: fp32 contiguous `[S, T, 2]` as `forward` returned it;
    `grad`: fp32 contiguous `[S, T]`."""
    S, T, V = logits.shape
    if S * T == 0 or V == 0:
        return
    with kernels.on_device(logits.device):
        kernels.entry("token_logps_backward")(
            logits.data_ptr(), extension.dtype_code(logits.dtype), S, T, V, logits.stride(0), logits.stride(1),
            targets.data_ptr(), ignore_index, row_stats.data_ptr(), grad.data_ptr(),
            out.data_ptr(), out.stride(0), out.stride(1), kernels.stream(logits.device),
        )
