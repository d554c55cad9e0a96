"""`dk.dpo_loss`: the DPO loss family on per-sequence log-probs (`[B]` tensors, nothing of size V)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..outputs import DPOLossOutput
from . import options as opts
from .f_divergence import f_divergence_scores
from .pair_losses import PAIR_LOSSES, PairTerms


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.0,
    reference_free: bool = False,
    chosen_num_tokens: Optional[torch.Tensor] = None,
    rejected_num_tokens: Optional[torch.Tensor] = None,
    chosen_nll: Optional[torch.Tensor] = None,
    pair_weights: Optional[torch.Tensor] = None,
) -> DPOLossOutput:
    """The DPO-family loss of `B` preference pairs, with TRL 1.16 `DPOTrainer` semantics.

    Args:
        chosen_logps, rejected_logps: `[B]` policy log-probs of the chosen / rejected completions
            (sums over their tokens), differentiable.
        ref_chosen_logps, ref_rejected_logps: `[B]` reference log-probs; ignored (may be None) with
            `reference_free=True`, which takes them as 0.
        loss_type: a name from `LOSS_TYPES`, or a list of them: then
            `loss = sum_k loss_weights[k] * mean(per_pair_loss_k)` (`loss_weights` defaults to 1 each).
        label_smoothing: read by exo_pair (EXO's eps, in (0, 1)), robust (flip probability, in
            [0, 0.5)), aot and aot_unpaired; ignored by the others (TRL's sigmoid ignores it too).
        f_divergence_type, f_alpha_divergence_coef: the f-DPO score of each log-ratio (see
            `f_divergence.py`); a non-default value only with loss types built on the score difference.
        discopop_tau: DiscoPOP's temperature.
        simpo_gamma: SimPO's target margin gamma. The loss types built on the score difference
            (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop) use
            `d - simpo_gamma / beta` where they use `d`, d being their (length-normalised for ipo and
            sigmoid_norm) chosen-minus-rejected score; so sigmoid computes
            `-log sigmoid(beta d - simpo_gamma)`. The margin adds no length normalisation of its own:
            SimPO is `loss_type="sigmoid_norm", reference_free=True, simpo_gamma=gamma` (with token
            counts). sft is unaffected; other loss types reject a nonzero value. 0 is exactly TRL.
        chosen_num_tokens, rejected_num_tokens: `[B]` completion lengths (integer or float),
            needed by ipo and sigmoid_norm, which divide the scores by them (clamped to >= 1).
        chosen_nll: the sft term: a scalar (TRL's: the mean over all chosen tokens of the batch of
            -log p, applied to every pair) or `[B]` per-pair values. Without it, sft is computed as
            `-sum(chosen_logps) / sum(chosen_num_tokens)` (0 when there is no token), which is
            TRL's value when `chosen_logps` are plain (unweighted, unaveraged) sums.
        pair_weights: `[B]` multipliers of every per-pair loss before the mean (weighted or
            multi-objective data; `pair_weights = w_c * w_r` with WPO's weights gives WPO).
            Not allowed with aot / aot_unpaired, whose sorted per-element losses are not per pair.

    Returns `DPOLossOutput` (loss, losses `[B]`, detached rewards `beta * (policy - ref)`, nll_loss).
    Raises ValueError (TypeError for a wrong type) naming the option for an invalid value or
    combination, a missing tensor, or a shape or device mismatch. No device sync; `torch.compile`-able.
    Materialised: a few `[B]` tensors per loss type.
    """
    o = opts.check_loss_options(
        beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau, simpo_gamma=simpo_gamma, reference_free=reference_free,
    )
    if not isinstance(chosen_logps, torch.Tensor):
        raise TypeError(f"chosen_logps must be a torch.Tensor, got {type(chosen_logps).__name__}")
    if chosen_logps.dim() != 1 or chosen_logps.shape[0] == 0:
        raise ValueError(f"chosen_logps must have shape [B] with B >= 1, got {tuple(chosen_logps.shape)}")
    batch, device = chosen_logps.shape[0], chosen_logps.device
    opts.check_pair_tensor("chosen_logps", chosen_logps, batch, device)
    opts.check_pair_tensor("rejected_logps", rejected_logps, batch, device)

    if o.reference_free:
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    else:
        for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if value is None:
                raise ValueError(f"{name} is None: give the reference log-probs, or set reference_free=True")
            opts.check_pair_tensor(name, value, batch, device)

    types = set(o.loss_types)
    needs_counts = sorted(types & opts.LENGTH_NORMALISED_LOSS_TYPES)
    for name, value in (("chosen_num_tokens", chosen_num_tokens), ("rejected_num_tokens", rejected_num_tokens)):
        if value is None:
            if needs_counts:
                raise ValueError(f"{name} is None, but loss type(s) {needs_counts} divide by the completion lengths")
        else:
            opts.check_pair_tensor(name, value, batch, device, floating=False)
    if chosen_nll is not None:
        opts.check_pair_tensor("chosen_nll", chosen_nll, batch, device, allow_scalar=True)
    elif "sft" in types and chosen_num_tokens is None:
        raise ValueError(
            "chosen_nll is None and so is chosen_num_tokens, but loss type 'sft' needs the chosen NLL: give "
            "chosen_nll (mean NLL over the chosen tokens), or chosen_num_tokens to compute it from chosen_logps"
        )
    if pair_weights is not None:
        opts.check_pair_tensor("pair_weights", pair_weights, batch, device)
        opts.check_pair_weights_loss_types(o.loss_types)

    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    dtype = chosen_logratios.dtype

    def counts(value):
        return None if value is None else value.to(dtype).clamp(min=1.0)

    sft_losses = None
    if "sft" in types:
        if chosen_nll is None:
            total = chosen_num_tokens.sum().to(dtype).clamp(min=1.0)
            chosen_nll = -chosen_logps.sum() / total
        sft_losses = chosen_nll.expand(batch) if chosen_nll.dim() == 0 else chosen_nll

    terms = PairTerms(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(chosen_logratios, o.f_divergence_type, o.f_alpha_divergence_coef),
        rejected_scores=f_divergence_scores(rejected_logratios, o.f_divergence_type, o.f_alpha_divergence_coef),
        chosen_counts=counts(chosen_num_tokens), rejected_counts=counts(rejected_num_tokens),
        sft_losses=sft_losses, beta=o.beta, margin=o.simpo_gamma / o.beta,
        label_smoothing=o.label_smoothing, discopop_tau=o.discopop_tau,
    )

    loss = None
    losses = None
    for name, weight in zip(o.loss_types, o.loss_weights):
        per_pair = PAIR_LOSSES[name](terms)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        # TRL's order of operations: the mean of each loss type, weighted, then summed
        term = per_pair.mean() * weight
        loss = term if loss is None else loss + term
        weighted = per_pair * weight
        losses = weighted if losses is None else losses + weighted

    nll_loss = None if sft_losses is None else sft_losses.detach().mean()
    return DPOLossOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=(o.beta * chosen_logratios).detach(),
        rejected_rewards=(o.beta * rejected_logratios).detach(),
        nll_loss=nll_loss,
    )
