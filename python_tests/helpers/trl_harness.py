"""Runs TRL 1.16's real `DPOTrainer._compute_loss` on given per-token log-probs, without a model.

`_compute_loss` is called unbound with a `SimpleNamespace` standing in for the trainer (the
attributes it reads: beta, loss_types, loss_weights, ...), a fake accelerator (one process:
gather is the identity) and fake policy / reference models whose forward returns the per-token
log-probs given here, as TRL's fused LM head would: `[2B, T - 1]`, aligned with
`completion_mask[:, 1:]`, 0 where masked. Everything else of the trainer (tokenisation, model
forward, the LM-head kernel) is not involved, so what is compared is TRL's loss math itself.
Tests import this module only after `pytest.importorskip("trl")`.
"""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Dict, Optional, Sequence, Tuple

import torch
from trl.trainer.dpo_trainer import DPOTrainer


class _FakeModel:
    """Returns TRL's fused-LM-head outputs for the given `[2B, T - 1]` per-token log-probs."""

    def __init__(self, token_logps: torch.Tensor, extras: Optional[Dict[str, torch.Tensor]] = None):
        self.token_logps = token_logps
        self.extras = extras or {}
        self.training = True
        self.is_gradient_checkpointing = False

    def __call__(self, **kwargs):
        assert kwargs["fused_lm_head"] is True
        shape = self.token_logps.shape
        zeros = torch.zeros(shape, dtype=self.token_logps.dtype)
        return types.SimpleNamespace(
            log_probs=self.token_logps,
            entropy=self.extras.get("entropy", zeros),
            mean_logits=self.extras.get("mean_logits", zeros),
            is_top1=self.extras.get("is_top1", torch.zeros(shape, dtype=torch.bool)),
            log_sum_sq_probs=self.extras.get("log_sum_sq_probs"),
        )


def trl_dpo_loss(
    token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_token_logps: Optional[torch.Tensor] = None,
    loss_type: Sequence[str] = ("sigmoid",),
    loss_weights: Optional[Sequence[float]] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    ld_alpha: Optional[float] = None,
    use_weighting: bool = False,
    extras: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(TRL's loss, TRL's logged metrics: the last value of each) for one batch.

    token_logps: the policy's `[2B, T - 1]` per-token log-probs (0 where
        `completion_mask[:, 1:]` is 0), differentiable. Reference: precomputed `[B]` log-probs, or
        `ref_token_logps` like `token_logps` (then TRL's non-precomputed path, LD-DPO included).
    extras: the policy's per-token `entropy`, `mean_logits`, `is_top1`, `log_sum_sq_probs` (like
        `token_logps`), as TRL's fused LM head returns them; zeros (None for the last) otherwise.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    policy = _FakeModel(token_logps, extras)
    precompute = ref_token_logps is None
    trainer = types.SimpleNamespace(
        model=policy,
        ref_model=None if precompute else _FakeModel(ref_token_logps),
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        beta=beta,
        loss_types=loss_types,
        loss_weights=list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types),
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
        precompute_ref_logps=precompute,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    rows, length = completion_mask.shape
    inputs = {
        "input_ids": torch.zeros(rows, length, dtype=torch.long),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    if precompute:
        inputs["ref_chosen_logps"] = ref_chosen_logps
        inputs["ref_rejected_logps"] = ref_rejected_logps
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, False)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss, metrics
