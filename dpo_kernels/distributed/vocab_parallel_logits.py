"""The logits path with the vocabulary split across ranks: token log-probs from `[S, T, V_local]`
logits slices, with the existing logits-path kernels on each slice and combine.py in between.

Forward: each rank runs the fused kernel on its slice, with every scored position's target mapped
into the slice (its local id where this rank holds it, else column 0, whose value is discarded), so
the kernel returns the slice's (max, log sum-exp) and, where this rank holds the target, its
log-prob within the slice; combine.py turns these into whole-vocabulary log-probs and row
statistics (3 values per position all-reduced).

Backward needs no communication: each rank writes the gradient of its own slice,
`g * (onehot - exp(z - M - log S))`, with the same kernel given the combined row statistics; at
positions whose target another rank holds, the kernel's onehot at column 0 is then overwritten
with `-g * p_0` from the logit saved in forward. Every rank must backpropagate the same gradient
(the replicated outputs feed the same loss on every rank).

Materialised beyond the single-process path: a few `[S, T]` tensors (targets, masks, column 0 of
the logits in fp32); no `[S, T, V_local]` tensor besides the gradient itself (none with
`inplace_backward`).
"""

from __future__ import annotations

import importlib

import torch

from .combine import combine_token_logps
from .vocab_shard import VocabShard

KERNEL_IGNORE = -1  # the kernels' ignore value for masked positions: local targets are >= 0


def _launcher(backend: str):
    return importlib.import_module(f"dpo_kernels.backends.{backend}_token_logps")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class VocabParallelTokenLogps(torch.autograd.Function):
    """(logits `[S, T, V_local]`, targets int64 `[S, T]` global ids aligned with the rows,
    ignore_index, shard, backend, inplace_backward) -> token log-probs `[S, T]` over the whole
    vocabulary (0 where masked), in the accumulation dtype, identical on every rank."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, shard: VocabShard, backend: str, inplace_backward: bool):
        valid = targets != ignore_index
        local = targets - shard.start
        owner = valid & (local >= 0) & (local < shard.local_size)
        kernel_targets = torch.where(owner, local, torch.where(valid, torch.zeros_like(local),
                                                               torch.full_like(local, KERNEL_IGNORE)))
        launcher = _launcher(backend)
        local_logps, local_stats = launcher.forward(logits, kernel_targets, KERNEL_IGNORE)
        token_logps, row_stats = combine_token_logps(local_logps, local_stats, valid, owner, shard.group)
        elsewhere = valid & ~owner
        column0 = logits[..., 0].to(row_stats.dtype, copy=True)  # in-place backward overwrites the logits
        ctx.save_for_backward(logits, kernel_targets, row_stats, elsewhere, column0)
        ctx.backend, ctx.inplace_backward = backend, inplace_backward
        return token_logps

    @staticmethod
    def backward(ctx, grad):
        logits, kernel_targets, row_stats, elsewhere, column0 = ctx.saved_tensors
        g = grad.to(row_stats.dtype).contiguous()
        out = logits if ctx.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _launcher(ctx.backend).backward(logits, kernel_targets, KERNEL_IGNORE, row_stats, g, out)
        # column 0 stood in for targets held elsewhere: its gradient is -g p_0, no onehot
        p0 = torch.exp((column0 - row_stats[..., 0]) - row_stats[..., 1])
        col = out[..., 0]
        col.copy_(torch.where(elsewhere, (-g * p0).to(out.dtype), col))
        return out, None, None, None, None, None
