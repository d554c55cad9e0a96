"""The quantities TRL's DPOTrainer logs, as detached 0-dim tensors built from `[B]` tensors
(no device sync; `DPOOutput.metrics` turns them into floats)."""

from __future__ import annotations

from typing import Dict, Optional

import torch


def dpo_metric_tensors(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    nll_loss: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """`rewards/chosen`, `rewards/rejected` (batch means of beta * log-ratio), `rewards/accuracies`
    (fraction of pairs with chosen reward > rejected reward), `rewards/margins`, `logps/chosen`,
    `logps/rejected` (batch means of the policy log-probs), and `nll_loss` (the sft term) when given."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
    if nll_loss is not None:
        metrics["nll_loss"] = nll_loss.detach()
    return metrics
