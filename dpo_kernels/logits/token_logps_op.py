"""The logits path as torch.library custom ops: `dpo_kernels::token_logps`,
`dpo_kernels::token_logps_extras` and their backward.

`token_logps(logits [S, T, V], targets [S, T], ...)` returns the per-position log-probs `[S, T]`
and each row's log-sum-exp as the pair (max, log of the sum of exp(x - max)) `[S, T, 2]` (fp32;
float64 for float64 logits). The pair is kept apart because one fp32 number loses 1e-3 at
logits near 1e4. `token_logps_extras` returns the same two plus the per-token extras (entropy,
mean_logits, is_top1, log_sum_sq_probs; 0 / False where masked), from the kernels' single pass
with extras (backends/token_logps_launch.py) finished by backends/tile_epilogue.finish_stats, as
the linear path finishes its statistics. Their autograd formula calls `token_logps_backward`, which
allocates the `[S, T, V]` gradient (the only logits-sized tensor of the path), or
`token_logps_backward_`, which writes it into the logits' own storage (`inplace_backward=True`);
a gradient flowing into `entropy` joins in the same pass. Fake implementations let torch.compile
trace through without graph breaks. The backend string picks the kernel launcher through
backends/kernel_table.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends.kernel_table import kernel_module
from ..backends.tile_epilogue import FinishedStats, TileStats, finish_stats
from ..backends.token_logps_launch import acc_dtype


def _launcher(backend: str):
    return kernel_module("token_logps", backend)


@torch.library.custom_op("dpo_kernels::token_logps", mutates_args=())
def token_logps(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, backend: str, inplace_backward: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launcher(backend).forward(logits, targets, ignore_index)


@token_logps.register_fake
def _token_logps_fake(logits, targets, ignore_index, backend, inplace_backward):
    acc = acc_dtype(logits.dtype)
    return targets.new_empty(targets.shape, dtype=acc), targets.new_empty((*targets.shape, 2), dtype=acc)


def masked_results(stats: TileStats, valid: torch.Tensor, vocab_size: int) -> FinishedStats:
    """finish_stats with every masked position (not `valid`) set to 0 (False), row_stats included,
    so that backward never meets the empty set's -inf there."""
    finished = finish_stats(stats, vocab_size)
    return FinishedStats(*(
        None if t is None else t & valid if t.dtype == torch.bool
        else torch.where(valid.unsqueeze(-1) if t.dim() > valid.dim() else valid, t, torch.zeros_like(t))
        for t in finished
    ))


@torch.library.custom_op("dpo_kernels::token_logps_extras", mutates_args=())
def token_logps_extras(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, backend: str, inplace_backward: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_logps, row_stats, entropy, mean_logits, is_top1, log_sum_sq_probs)."""
    stats = _launcher(backend).forward(logits, targets, ignore_index, extras=True)
    return tuple(masked_results(TileStats(*stats.unbind(-1)), targets != ignore_index, logits.shape[-1]))


@token_logps_extras.register_fake
def _token_logps_extras_fake(logits, targets, ignore_index, backend, inplace_backward):
    acc = acc_dtype(logits.dtype)
    per_token = [targets.new_empty(targets.shape, dtype=acc) for _ in range(3)]
    return (per_token[0], targets.new_empty((*targets.shape, 2), dtype=acc), per_token[1], per_token[2],
            targets.new_empty(targets.shape, dtype=torch.bool), targets.new_empty(targets.shape, dtype=acc))


@torch.library.custom_op("dpo_kernels::token_logps_backward", mutates_args=())
def token_logps_backward(
    logits: torch.Tensor, targets: torch.Tensor, row_stats: torch.Tensor, grad: torch.Tensor, ignore_index: int,
    backend: str, entropy_grad: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launcher(backend).backward(logits, targets, ignore_index, row_stats, grad, out, entropy_grad, entropy)
    return out


@token_logps_backward.register_fake
def _token_logps_backward_fake(logits, targets, row_stats, grad, ignore_index, backend, entropy_grad=None,
                               entropy=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("dpo_kernels::token_logps_backward_", mutates_args=("logits",))
def token_logps_backward_(
    logits: torch.Tensor, targets: torch.Tensor, row_stats: torch.Tensor, grad: torch.Tensor, ignore_index: int,
    backend: str, entropy_grad: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
) -> None:
    _launcher(backend).backward(logits, targets, ignore_index, row_stats, grad, logits, entropy_grad, entropy)


@token_logps_backward_.register_fake
def _token_logps_backward_inplace_fake(logits, targets, row_stats, grad, ignore_index, backend, entropy_grad=None,
                                       entropy=None):
    return None


def _logits_grad(ctx, grad_token_logps, grad_entropy=None, entropy=None):
    """The logits gradient from the saved (logits, targets, row_stats) and the outputs' gradients:
    into the logits' storage with inplace_backward, else into a fresh buffer."""
    logits, targets, row_stats = ctx.saved_tensors[:3]
    acc = row_stats.dtype
    if grad_token_logps is None:
        grad_token_logps = torch.zeros(targets.shape, dtype=acc, device=targets.device)
    grad = grad_token_logps.to(acc).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(acc).contiguous()
    else:
        entropy = None
    if ctx.inplace_backward:
        token_logps_backward_(logits, targets, row_stats, grad, ctx.ignore_index, ctx.backend, grad_entropy, entropy)
        return logits
    return token_logps_backward(logits, targets, row_stats, grad, ctx.ignore_index, ctx.backend, grad_entropy, entropy)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, backend, inplace_backward = inputs
    row_stats = output[1]
    # entropy is often returned for logging only: with no gradient flowing into it, backward gets
    # None and skips the entropy term
    ctx.set_materialize_grads(False)
    not_differentiable = [output[1]] + ([output[3], output[5]] if len(output) > 2 else [])
    ctx.mark_non_differentiable(*not_differentiable)
    ctx.save_for_backward(logits, targets, row_stats, *output[2:3])
    ctx.ignore_index = ignore_index
    ctx.backend = backend
    ctx.inplace_backward = inplace_backward


def _backward(ctx, grad_token_logps, grad_row_stats):
    return _logits_grad(ctx, grad_token_logps), None, None, None, None


def _backward_extras(ctx, grad_token_logps, grad_row_stats, grad_entropy, *_not_differentiable):
    return _logits_grad(ctx, grad_token_logps, grad_entropy, ctx.saved_tensors[3]), None, None, None, None


torch.library.register_autograd("dpo_kernels::token_logps", _backward, setup_context=_setup_context)
torch.library.register_autograd("dpo_kernels::token_logps_extras", _backward_extras, setup_context=_setup_context)
