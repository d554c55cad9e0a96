"""What the two drop-in calls (`fused_dpo_loss`, `fused_linear_dpo_loss`) share once the policy's
log-probs are computed: option checks, the reference-source rules, LD-DPO weights, the sft NLL,
WPO's pair weights, `dk.dpo_loss` and TRL's metrics. Works on `[2B, T]` and `[B]` tensors only."""

from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from .. import validation
from ..outputs import DPOOutput, LogpsOutput
from . import options as loss_opts
from .dpo_loss import dpo_loss
from .ld_dpo_weights import ld_dpo_token_weights
from .metrics import dpo_metric_tensors

# the keyword options of dk.dpo_loss that the fused calls pass through
DPO_LOSS_OPTIONS = (
    "beta", "loss_type", "loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
    "discopop_tau", "simpo_gamma", "reference_free", "pair_weights",
)
# the options only the fused calls have (they need the per-token quantities)
FUSED_OPTIONS = ("ld_alpha", "use_weighting")
LOSS_OPTION_NAMES = DPO_LOSS_OPTIONS + FUSED_OPTIONS


def check_fused_options(loss_options: dict, caller: str) -> None:
    """Names and values of the loss options, before any kernel: TypeError for an unknown name,
    ValueError naming the option for a bad value."""
    unknown = sorted(set(loss_options) - set(LOSS_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"{caller}() got unknown loss option(s) {unknown}; the options are {sorted(LOSS_OPTION_NAMES)}"
        )
    scalar_options = {k: v for k, v in loss_options.items() if k in DPO_LOSS_OPTIONS and k != "pair_weights"}
    loss_opts.check_loss_options(**scalar_options)
    ld_alpha = loss_options.get("ld_alpha")
    if ld_alpha is not None:
        if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, Real):
            raise TypeError(f"ld_alpha must be a real number or None, got {type(ld_alpha).__name__}")
        if not 0.0 <= float(ld_alpha) <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1] (1 weighs every token equally), got {ld_alpha}")
    use_weighting = loss_options.get("use_weighting", False)
    validation.check_bool("use_weighting", use_weighting)
    if use_weighting:
        loss_types = loss_opts.normalise_loss_types(loss_options.get("loss_type", "sigmoid"))
        sorting = sorted(set(loss_types) & loss_opts.SORTING_LOSS_TYPES)
        if sorting:
            raise ValueError(f"use_weighting=True cannot be used with loss type(s) {sorting} (as in TRL): "
                             "they sort over the batch, so their losses are not per pair")


def check_reference_source(*, precomputed: tuple, source_name: str, source_given: bool, reference_free: bool,
                           batch: int, device, ref_chosen_logps, ref_rejected_logps, device_of: str) -> None:
    """Exactly one source of reference log-probs: precomputed `[B]` pairs, or `source_name`, or
    none with `reference_free=True`."""
    if precomputed[0] != precomputed[1]:
        missing = "ref_rejected_logps" if precomputed[0] else "ref_chosen_logps"
        raise ValueError(f"{missing} is None: give both ref_chosen_logps and ref_rejected_logps, or neither")
    if reference_free:
        if source_given:
            raise ValueError(f"{source_name} is given but reference_free=True uses no reference: "
                             f"pass {source_name}=None")
    elif precomputed[0] and source_given:
        raise ValueError(f"give either {source_name} or ref_chosen_logps/ref_rejected_logps, not both")
    elif not precomputed[0] and not source_given:
        raise ValueError(
            f"no reference: give ref_chosen_logps and ref_rejected_logps, or {source_name}, or set reference_free=True"
        )
    if precomputed[0] and not reference_free:
        for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            loss_opts.check_pair_tensor(name, value, batch, device, device_of=device_of)


def check_pair_weights(loss_options: dict, batch: int, device, device_of: str) -> None:
    pair_weights = loss_options.get("pair_weights")
    if pair_weights is not None:
        loss_opts.check_pair_tensor("pair_weights", pair_weights, batch, device, device_of=device_of)
        loss_types = loss_opts.normalise_loss_types(loss_options.get("loss_type", "sigmoid"))
        loss_opts.check_pair_weights_loss_types(loss_types)


def ld_alpha_weights(labels: torch.Tensor, loss_options: dict, *, ignore_index: int, shift: bool,
                     dtype: torch.dtype) -> Optional[torch.Tensor]:
    """LD-DPO's label-aligned `[2B, T]` token weights, or None without `ld_alpha`."""
    ld_alpha = loss_options.get("ld_alpha")
    if ld_alpha is None:
        return None
    return ld_dpo_token_weights(labels, float(ld_alpha), ignore_index=ignore_index, shift=shift, dtype=dtype)


# per-token extras behind TRL's logged `entropy`, `logits/*` and `mean_token_accuracy`
METRIC_EXTRAS = ("entropy", "mean_logits", "is_top1")


def policy_extras(loss_options: dict) -> tuple:
    """The per-token extras the policy's pass computes: TRL's metrics', and WPO's log sum_v p_v^2."""
    return METRIC_EXTRAS + (("log_sum_sq_probs",) if loss_options.get("use_weighting", False) else ())


def needs_token_logps(loss_options: dict, token_weights: Optional[torch.Tensor]) -> bool:
    """Whether the policy's per-token log-probs are needed (sft under LD-DPO weights, or WPO)."""
    loss_types = loss_opts.normalise_loss_types(loss_options.get("loss_type", "sigmoid"))
    return (token_weights is not None and "sft" in loss_types) or bool(loss_options.get("use_weighting", False))


def dpo_output(policy: LogpsOutput, ref_chosen_logps, ref_rejected_logps, *, valid: torch.Tensor,
               token_weights: Optional[torch.Tensor], loss_options: dict) -> DPOOutput:
    """The loss and metrics from the policy's `LogpsOutput` (`[2B]` rows, token_logps and extras
    position-aligned) and the reference's `[B]` log-probs. `valid`: position-aligned `[2B, T]`
    mask of scored tokens."""
    batch = policy.logps.shape[0] // 2
    loss_types = loss_opts.normalise_loss_types(loss_options.get("loss_type", "sigmoid"))
    chosen_logps, rejected_logps = policy.logps.chunk(2)
    chosen_counts, rejected_counts = policy.num_tokens.chunk(2)
    chosen_nll = None
    if token_weights is not None and "sft" in loss_types:
        # sft takes the unweighted chosen log-probs: with LD-DPO weights they are not the sums in logps
        total = chosen_counts.sum().to(policy.token_logps.dtype).clamp(min=1.0)
        chosen_nll = -policy.token_logps[:batch].sum() / total

    dpo_options = {k: v for k, v in loss_options.items() if k in DPO_LOSS_OPTIONS}
    if loss_options.get("use_weighting", False):
        wpo = wpo_pair_weights(policy.token_logps, policy.log_sum_sq_probs, valid)
        given = dpo_options.get("pair_weights")
        dpo_options["pair_weights"] = wpo if given is None else given * wpo
    result = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_num_tokens=chosen_counts, rejected_num_tokens=rejected_counts, chosen_nll=chosen_nll,
        **dpo_options,
    )
    metrics = dpo_metric_tensors(chosen_logps, rejected_logps, result.chosen_rewards, result.rejected_rewards,
                                 result.nll_loss)
    metrics.update(token_metric_tensors(policy, valid))
    return DPOOutput(
        loss=result.loss, losses=result.losses, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        chosen_rewards=result.chosen_rewards, rejected_rewards=result.rejected_rewards, metric_tensors=metrics,
    )


def wpo_pair_weights(token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """WPO's `[B]` pair weights (TRL 1.16): per sequence, w = exp(mean over its scored tokens of
    log p(target) - log sum_v p_v^2), and a pair's weight is w_chosen * w_rejected. Detached."""
    with torch.no_grad():
        aligned = torch.where(valid, token_logps - log_sum_sq_probs, torch.zeros_like(token_logps))
        weights = torch.exp(aligned.sum(dim=1) / valid.sum(dim=1).clamp(min=1).to(aligned.dtype))
        chosen, rejected = weights.chunk(2)
        return chosen * rejected


def token_metric_tensors(policy: LogpsOutput, valid: torch.Tensor):
    """TRL's per-token metrics from the extras that are present: `entropy` (mean over all scored
    tokens), `logits/chosen`, `logits/rejected` (mean logit over the scored tokens of each side) and
    `mean_token_accuracy` (fraction of chosen scored tokens whose target is the argmax)."""
    metrics = {}
    chosen_valid, rejected_valid = valid.chunk(2)

    def masked_mean(values, mask):
        values = values.detach()
        return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1).to(values.dtype)

    if policy.entropy is not None:
        metrics["entropy"] = masked_mean(policy.entropy, valid)
    if policy.mean_logits is not None:
        chosen, rejected = policy.mean_logits.chunk(2)
        metrics["logits/chosen"] = masked_mean(chosen, chosen_valid)
        metrics["logits/rejected"] = masked_mean(rejected, rejected_valid)
    if policy.is_top1 is not None:
        chosen_top1 = policy.is_top1.chunk(2)[0].to(policy.logps.dtype)
        metrics["mean_token_accuracy"] = masked_mean(chosen_top1, chosen_valid)
    return metrics
