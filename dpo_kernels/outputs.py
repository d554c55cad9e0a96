"""Result types of the log-prob and loss calls."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch


# The per-token extras `dk.sequence_logps` and `dk.linear_sequence_logps` can return (LogpsOutput fields).
EXTRAS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


class LogpsOutput(NamedTuple):
    """Per-sequence log-probs and what the call computed along the way.

    logps: `[S]` sum (or mean over unmasked tokens, with `average=True`) of the weighted token
        log-probs; fp32 (float64 for float64 logits). 0 for a row with no unmasked token.
    num_tokens: `[S]` int64 count of unmasked tokens.
    token_logps: per-position log-probs shaped like `labels` (0 where masked), or None unless
        `return_token_logps=True`.
    entropy, mean_logits, is_top1, log_sum_sq_probs: per-token extras (`extras=`), shaped like
        `labels`, 0 (False) where masked, or None when not requested.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None


class DPOLossOutput(NamedTuple):
    """Result of `dk.dpo_loss`, all on `[B]` pairs.

    loss: scalar, differentiable: `sum_k loss_weights[k] * mean(pair_weights * per_pair_loss_k)`.
    losses: `[B]` differentiable: `sum_k loss_weights[k] * pair_weights * per_pair_loss_k`, the
        terms whose mean is `loss`. For `aot`/`aot_unpaired` the terms are in sorted (quantile)
        order, not in pair order, as those losses pair sorted values.
    chosen_rewards, rejected_rewards: `[B]` detached `beta * (policy - reference)` log-prob ratios
        (the plain ratios, whatever `f_divergence_type`; the policy log-probs when reference-free).
    nll_loss: detached scalar, the mean over pairs of the `sft` term, or None when `sft` is not
        among the loss types.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    nll_loss: Optional[torch.Tensor] = None


class DPOOutput(NamedTuple):
    """Result of `dk.fused_dpo_loss`.

    loss, losses, chosen_rewards, rejected_rewards: as in `DPOLossOutput`.
    chosen_logps, rejected_logps: `[B]` policy log-probs (LD-DPO-weighted when `ld_alpha` is set),
        differentiable.
    metric_tensors: the logged quantities as detached 0-dim tensors, keyed as TRL logs them; no
        device sync is needed to build them (so the call stays `torch.compile`-able).
    `metrics` (a property): the same as Python floats, read in one device-to-host copy, which
        synchronises with the device; read it outside any compiled region.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metric_tensors: Dict[str, torch.Tensor]

    @property
    def metrics(self) -> Dict[str, float]:
        """`metric_tensors` as floats: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
        `rewards/margins`, `logps/chosen`, `logps/rejected`, `entropy`, `logits/chosen`,
        `logits/rejected`, `mean_token_accuracy`, and `nll_loss` when `sft` is used."""
        if not self.metric_tensors:
            return {}
        names = list(self.metric_tensors)
        values = torch.stack([self.metric_tensors[n].to(torch.float64) for n in names]).tolist()
        return dict(zip(names, values))
