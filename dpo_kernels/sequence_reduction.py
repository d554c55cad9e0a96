"""From per-position values to per-sequence results, on `[S, T]` tensors only (never `[N, V]`).

`shift` is applied here, to the small labels and weights tensors, so that kernels see targets
already aligned with their logits rows and never copy or offset the logits themselves.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

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


def per_position_outputs(per_position: Dict[str, torch.Tensor], return_token_logps: bool,
                         unbatched: bool) -> Dict[str, torch.Tensor]:
    """The LogpsOutput fields of the per-position results (`token_logps` only when asked for), with
    the batch dimension dropped again for a 2-D (unbatched) call."""
    return {key: values[0] if unbatched else values for key, values in per_position.items()
            if key != "token_logps" or return_token_logps}
