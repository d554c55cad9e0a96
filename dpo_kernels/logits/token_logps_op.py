"""The logits path as torch.library custom ops: `dpo_kernels::token_logps` and its backward.

`token_logps(logits [S, T, V], targets [S, T], ...)` returns the per-position log-probs `[S, T]`
and each row's log-sum-exp as the pair (max, log of the sum of exp(x - max)) `[S, T, 2]` (fp32;
float64 for float64 logits). The pair is kept apart because one fp32 number loses 1e-3 at
logits near 1e4. Its autograd formula calls
`token_logps_backward`, which allocates the `[S, T, V]` gradient (the only logits-sized tensor of
the path), or `token_logps_backward_`, which writes it into the logits' own storage
(`inplace_backward=True`). Fake implementations let torch.compile trace through without graph
breaks. The backend string picks the kernel launcher through backends/kernel_table.py.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..backends.kernel_table import kernel_module


def _launcher(backend: str):
    return kernel_module("token_logps", backend)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("dpo_kernels::token_logps", mutates_args=())
def token_logps(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, backend: str, inplace_backward: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launcher(backend).forward(logits, targets, ignore_index)


@token_logps.register_fake
def _token_logps_fake(logits, targets, ignore_index, backend, inplace_backward):
    acc = _acc_dtype(logits.dtype)
    return targets.new_empty(targets.shape, dtype=acc), targets.new_empty((*targets.shape, 2), dtype=acc)


@torch.library.custom_op("dpo_kernels::token_logps_backward", mutates_args=())
def token_logps_backward(
    logits: torch.Tensor, targets: torch.Tensor, row_stats: torch.Tensor, grad: torch.Tensor, ignore_index: int, backend: str
) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launcher(backend).backward(logits, targets, ignore_index, row_stats, grad, out)
    return out


@token_logps_backward.register_fake
def _token_logps_backward_fake(logits, targets, row_stats, grad, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("dpo_kernels::token_logps_backward_", mutates_args=("logits",))
def token_logps_backward_(
    logits: torch.Tensor, targets: torch.Tensor, row_stats: torch.Tensor, grad: torch.Tensor, ignore_index: int, backend: str
) -> None:
    _launcher(backend).backward(logits, targets, ignore_index, row_stats, grad, logits)


@token_logps_backward_.register_fake
def _token_logps_backward_inplace_fake(logits, targets, row_stats, grad, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, backend, inplace_backward = inputs
    _, row_stats = output
    ctx.save_for_backward(logits, targets, row_stats)
    ctx.ignore_index = ignore_index
    ctx.backend = backend
    ctx.inplace_backward = inplace_backward


def _backward(ctx, grad_token_logps, grad_row_stats):
    logits, targets, row_stats = ctx.saved_tensors
    grad = grad_token_logps.to(row_stats.dtype).contiguous()
    if ctx.inplace_backward:
        token_logps_backward_(logits, targets, row_stats, grad, ctx.ignore_index, ctx.backend)
        dlogits = logits
    else:
        dlogits = token_logps_backward(logits, targets, row_stats, grad, ctx.ignore_index, ctx.backend)
    return dlogits, None, None, None, None


torch.library.register_autograd("dpo_kernels::token_logps", _backward, setup_context=_setup_context)
