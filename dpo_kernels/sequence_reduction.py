"""From per-position values to per-sequence results, on `[S, T]` tensors only (never `[N, V]`).

`shift` is applied here, to the small labels and weights tensors, so that kernels see targets
already aligned with their logits rows and never copy or offset the logits themselves.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def aligned_targets(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    """int64 contiguous `[S, T]` target of each position; with `shift`, labels[:, t + 1] and
    ignore_index at the last position."""
    labels = labels.to(torch.int64)
    if shift:
        pad = torch.full_like(labels[:, :1], ignore_index)
        labels = torch.cat([labels[:, 1:], pad], dim=1)
    return labels.contiguous()


def aligned_weights(token_weights: torch.Tensor, shift: bool, dtype: torch.dtype) -> torch.Tensor:
    """Label-aligned weights moved to position alignment (see `aligned_targets`), in `dtype`."""
    weights = token_weights.to(dtype)
    if shift:
        weights = torch.cat([weights[:, 1:], torch.zeros_like(weights[:, :1])], dim=1)
    return weights


def reduce_to_sequences(
    token_logps: torch.Tensor,
    valid: torch.Tensor,
    weights: Optional[torch.Tensor],
    average: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logps `[S]`, num_tokens `[S]` int64) from position-aligned `[S, T]` values.

    Masked positions contribute nothing whatever their weight. Deterministic: a plain sum over T.
    A row with no unmasked token gets 0, also with `average`.
    """
    num_tokens = valid.sum(dim=1)
    contributions = token_logps
    if weights is not None:
        contributions = token_logps * torch.where(valid, weights, torch.zeros_like(weights))
    logps = contributions.sum(dim=1)
    if average:
        logps = logps / num_tokens.clamp(min=1).to(logps.dtype)
    return logps, num_tokens
