"""Result types of the log-prob calls."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class LogpsOutput(NamedTuple):
    """Per-sequence log-probs and what the call computed along the way.

    logps: `[S]` sum (or mean over unmasked tokens, with `average=True`) of the weighted token
        log-probs; fp32 (float64 for float64 logits). 0 for a row with no unmasked token.
    num_tokens: `[S]` int64 count of unmasked tokens.
    token_logps: per-position log-probs shaped like `labels` (0 where masked), or None unless
        `return_token_logps=True`.
    entropy, mean_logits, is_top1, log_sum_sq_probs: per-token extras of the linear path, shaped
        like `labels`, or None when not requested.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
