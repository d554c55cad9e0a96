"""The logits path with the vocabulary split across ranks: token log-probs from `[S, T, V_local]`
logits slices, with the existing logits-path kernels on each slice and combine.py in between.

Forward: each rank runs the fused kernel on its slice, with every scored position's target mapped
into the slice (its local id where this rank holds it, else column 0, whose value is discarded), so
the kernel returns the slice's (max, log sum-exp) and, where this rank holds the target, its
log-prob within the slice; combine.py turns these into whole-vocabulary log-probs and row
statistics (3 values per position all-reduced). With extras the kernel writes the slice's full
statistics instead (TileStats: softmax moments, sum of logits, maxima before / after the target;
at positions whose target another rank holds, the slice lies wholly before or after it), and
combine.py's combine_tile_stats merges them as the linear path's (8 values per position).

Backward needs no communication: each rank writes the gradient of its own slice,
`g * (onehot - exp(z - M - log S))` (less the entropy term `ge * p * (log p + H)` with the combined
entropy H), with the same kernel given the combined row statistics; at positions whose target
another rank holds, the kernel's onehot at column 0 is then overwritten with `-g * p_0` (less the
entropy term) from the logit saved in forward. Every rank must backpropagate the same gradient
(the replicated outputs feed the same loss on every rank).

Materialised beyond the single-process path: a few `[S, T]` tensors (targets, masks, column 0 of
the logits in fp32); no `[S, T, V_local]` tensor besides the gradient itself (none with
`inplace_backward`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..backends.kernel_table import kernel_module
from ..backends.tile_epilogue import TileStats
from ..logits.token_logps_op import masked_results
from .combine import combine_tile_stats, combine_token_logps
from .vocab_shard import VocabShard

KERNEL_IGNORE = -1  # the kernels' ignore value for masked positions: local targets are >= 0


def _local_stats(stats: torch.Tensor, local: torch.Tensor, owner: torch.Tensor, local_size: int) -> TileStats:
    """This slice's TileStats from the kernel's `[S, T, 8]` statistics, whose target was column 0
    where another rank holds it: there the target logit is 0 (the owner adds it) and the slice lies
    wholly before the target (target above the slice) or after it (below)."""
    st = TileStats(*stats.unbind(-1))
    ninf = torch.full_like(st.max, float("-inf"))
    return dataclasses.replace(
        st,
        target_logit=torch.where(owner, st.target_logit, torch.zeros_like(st.max)),
        max_before_target=torch.where(owner, st.max_before_target, torch.where(local >= local_size, st.max, ninf)),
        max_after_target=torch.where(owner, st.max_after_target, torch.where(local < 0, st.max, ninf)),
    )


class VocabParallelTokenLogps(torch.autograd.Function):
    """(logits `[S, T, V_local]`, targets int64 `[S, T]` global ids aligned with the rows,
    ignore_index, shard, backend, inplace_backward, extras) -> (token log-probs, entropy,
    mean_logits, is_top1, log_sum_sq_probs) `[S, T]` over the whole vocabulary (0 / False where
    masked), in the accumulation dtype, identical on every rank; the extras are None unless
    `extras`. Differentiable: token log-probs and entropy."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, shard: VocabShard, backend: str, inplace_backward: bool,
                extras: bool = False):
        ctx.set_materialize_grads(False)
        valid = targets != ignore_index
        local = targets - shard.start
        owner = valid & (local >= 0) & (local < shard.local_size)
        kernel_targets = torch.where(owner, local, torch.where(valid, torch.zeros_like(local),
                                                               torch.full_like(local, KERNEL_IGNORE)))
        launcher = kernel_module("token_logps", backend)
        entropy = mean_logits = is_top1 = log_sum_sq_probs = None
        if extras:
            stats = launcher.forward(logits, kernel_targets, KERNEL_IGNORE, extras=True)
            combined = combine_tile_stats(_local_stats(stats, local, owner, shard.local_size), shard.group)
            token_logps, row_stats, entropy, mean_logits, is_top1, log_sum_sq_probs = masked_results(
                combined, valid, shard.vocab_size)
            ctx.mark_non_differentiable(mean_logits, is_top1, log_sum_sq_probs)
        else:
            local_logps, local_stats = launcher.forward(logits, kernel_targets, KERNEL_IGNORE)
            token_logps, row_stats = combine_token_logps(local_logps, local_stats, valid, owner, shard.group)
        elsewhere = valid & ~owner
        column0 = logits[..., 0].to(row_stats.dtype, copy=True)  # in-place backward overwrites the logits
        ctx.save_for_backward(logits, kernel_targets, row_stats, elsewhere, column0, entropy)
        ctx.backend, ctx.inplace_backward = backend, inplace_backward
        return token_logps, entropy, mean_logits, is_top1, log_sum_sq_probs

    @staticmethod
    def backward(ctx, grad, grad_entropy, *_not_differentiable):
        logits, kernel_targets, row_stats, elsewhere, column0, entropy = ctx.saved_tensors
        acc = row_stats.dtype
        g = torch.zeros_like(row_stats[..., 0]) if grad is None else grad.to(acc).contiguous()
        ge = None if grad_entropy is None or entropy is None else grad_entropy.to(acc).contiguous()
        out = logits if ctx.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        kernel_module("token_logps", ctx.backend).backward(logits, kernel_targets, KERNEL_IGNORE, row_stats, g, out,
                                                          ge, None if ge is None else entropy)
        # column 0 stood in for targets held elsewhere: its gradient has no onehot term
        logp0 = (column0 - row_stats[..., 0]) - row_stats[..., 1]
        p0 = torch.exp(logp0)
        grad0 = -g * p0
        if ge is not None:
            grad0 = grad0 - ge * torch.where(p0 == 0, torch.zeros_like(p0), p0 * (logp0 + entropy))
        col = out[..., 0]
        col.copy_(torch.where(elsewhere, grad0.to(out.dtype), col))
        return out, None, None, None, None, None, None
