"""The vocabulary-parallel combine: per-token statistics over each rank's vocabulary slice merged
into the statistics over the whole vocabulary, with all-reduces of O(tokens) values.

Every rank holds the same tokens and a disjoint slice of the vocabulary. For token n, rank r has
folded its slice of the logits z into (see backends/tile_epilogue.py, TileStats)

    m_r = max z,  s_r = sum exp(z - m_r),  t_r = z[target] (0 unless r holds the target),
    c_r = sum exp(z - m_r) (z - m_r),  q_r = sum exp(2 (z - m_r)),  L_r = sum z,
    b_r / a_r = max of z over the ids of the slice below / above the target (-inf if none),

and the whole-vocabulary statistics are, with M = max_r m_r and e_r = exp(m_r - M),

    max = M                               sum_exp = sum_r e_r s_r        target_logit = sum_r t_r
    centered = sum_r e_r (c_r + s_r (m_r - M))       sum_sq = sum_r e_r^2 q_r      sum_logits = sum_r L_r
    max_before_target = max_r b_r         max_after_target = max_r a_r

(a rank whose slice is all -inf, s_r = 0, contributes 0). So one MAX all-reduce of
`1 + 2 [is_top1]` rows of N values, then one SUM all-reduce of
`2 + [entropy] + [log_sum_sq_probs] + [mean_logits]` rows: `forward_payload_rows` values per token
in the accumulation dtype (fp32; float64 for float64 inputs). Each sum adds exact partial results,
and target_logit is one nonzero term plus zeros, so it is exact.

Collectives are issued through `torch.distributed` (`dist.all_reduce`, looked up at call time)
and are not differentiable: the autograd functions that call this module compute their backward
with the combined statistics instead (see linear_token_logps.py and vocab_parallel_logits.py).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.distributed as dist

from ..backends.tile_epilogue import TileStats


def forward_payload_rows(extras: Sequence[str] = ()) -> int:
    """Values per token the linear path's forward all-reduces (MAX rows + SUM rows)."""
    extras = set(extras)
    max_rows = 1 + (2 if "is_top1" in extras else 0)
    sum_rows = 2 + sum(e in extras for e in ("entropy", "log_sum_sq_probs", "mean_logits"))
    return max_rows + sum_rows


def all_reduce_(tensor: torch.Tensor, op, group) -> torch.Tensor:
    """In-place all-reduce over `group` (skipped for an empty tensor: every rank has the same tokens,
    so every rank skips it)."""
    if tensor.numel() > 0:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def combine_tile_stats(stats: TileStats, group) -> TileStats:
    """The whole-vocabulary TileStats from this rank's (see the module docstring); two all-reduces.
    Allocates a few `[N]` rows; the input is not modified."""
    maxima = [stats.max]
    if stats.max_before_target is not None:
        maxima += [stats.max_before_target, stats.max_after_target]
    maxima = all_reduce_(torch.stack(maxima), dist.ReduceOp.MAX, group)
    M = maxima[0]
    s = stats.sum_exp
    empty = s == 0  # an all -inf slice: contributes nothing (a NaN sum falls through and propagates)
    shift = stats.max - M
    scale = torch.where(empty, torch.zeros_like(s), torch.exp(shift))
    sums = [s * scale, stats.target_logit]
    if stats.centered is not None:
        sums.append(torch.where(empty, torch.zeros_like(s), scale * (stats.centered + s * shift)))
    if stats.sum_sq is not None:
        sums.append(stats.sum_sq * scale * scale)
    if stats.sum_logits is not None:
        sums.append(stats.sum_logits)
    sums = iter(all_reduce_(torch.stack(sums), dist.ReduceOp.SUM, group))
    return TileStats(
        max=M, sum_exp=next(sums), target_logit=next(sums),
        centered=next(sums) if stats.centered is not None else None,
        sum_sq=next(sums) if stats.sum_sq is not None else None,
        sum_logits=next(sums) if stats.sum_logits is not None else None,
        max_before_target=maxima[1] if stats.max_before_target is not None else None,
        max_after_target=maxima[2] if stats.max_before_target is not None else None,
    )


def combine_token_logps(token_logps: torch.Tensor, row_stats: torch.Tensor, valid: torch.Tensor,
                        owner: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """The logits path's combine over `[S, T]` positions: (token log-probs `[S, T]`, 0 where not
    `valid`; row_stats `[S, T, 2]` = (M, log of the whole-vocabulary sum of exp(z - M))) from this
    rank's kernel outputs. `owner` marks the positions whose target this rank holds; there
    `token_logps + log_sum` is the target's `z - m_r`. One MAX all-reduce of S*T values and one SUM
    all-reduce of 2*S*T values."""
    m, log_sum = row_stats[..., 0], row_stats[..., 1]
    zero = torch.zeros_like(m)
    M = all_reduce_(torch.where(valid, m, zero), dist.ReduceOp.MAX, group)
    no_mass = ~valid | (m == float("-inf"))  # masked, or this slice of the row is all -inf
    shift = m - M
    partial_sum = torch.where(no_mass, zero, torch.exp(log_sum + shift))
    # the target's z - M, from the rank holding it (-inf if its whole slice is -inf)
    target = torch.where(m == float("-inf"), torch.full_like(m, float("-inf")), (token_logps + log_sum) + shift)
    target = torch.where(owner, target, zero)
    total, target = all_reduce_(torch.stack([partial_sum, target]), dist.ReduceOp.SUM, group)
    log_total = torch.where(valid, total.log(), zero)
    logps = torch.where(valid, target - log_total, zero)
    return logps, torch.stack([M, log_total], dim=-1)
