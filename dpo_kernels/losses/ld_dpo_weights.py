"""LD-DPO's token weights (Liu et al. 2024, TRL 1.16 semantics), on `[2B, T]` label tensors only.

For each pair, the first `min(len_chosen, len_rejected)` scored tokens of both completions (the
shared length) weigh 1 and every later scored token weighs `ld_alpha`, so that the extra length of
the longer completion counts less. Lengths count the scored (non-ignored) targets.
"""

from __future__ import annotations

import torch


def ld_dpo_token_weights(
    labels: torch.Tensor, ld_alpha: float, *, ignore_index: int, shift: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Label-aligned `[2B, T]` weights for `dk.sequence_logps(token_weights=...)` (chosen rows first).

    With `shift=True`, `labels[:, 0]` is no position's target and does not count. Ignored positions
    get a weight too, which the kernels never read. Materialised: a few `[2B, T]` tensors.
    """
    scored = labels != ignore_index
    if shift:
        scored = torch.cat([torch.zeros_like(scored[:, :1]), scored[:, 1:]], dim=1)
    position = scored.cumsum(dim=1)  # 1 at the first scored token
    chosen_len, rejected_len = scored.sum(dim=1).chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2)
    one = torch.ones((), dtype=dtype, device=labels.device)
    return torch.where(position <= shared[:, None], one, one * ld_alpha)
