"""`dk.fused_dpo_loss`: the DPO loss family straight from the policy logits, with the fused
logits-path kernels computing the per-sequence log-probs."""

from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from . import validation
from .backends.availability import resolve_backend
from .ld_dpo_weights import ld_dpo_token_weights
from .losses import options as loss_opts
from .losses.dpo_loss import dpo_loss
from .losses.metrics import dpo_metric_tensors
from .outputs import DPOOutput
from .sequence_logps import sequence_logps

# the keyword options of dk.dpo_loss that fused_dpo_loss passes through
DPO_LOSS_OPTIONS = (
    "beta", "loss_type", "loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
    "discopop_tau", "simpo_gamma", "reference_free", "pair_weights",
)
# the options only the fused calls have (they need the per-token quantities)
FUSED_OPTIONS = ("ld_alpha", "use_weighting")
LOSS_OPTION_NAMES = DPO_LOSS_OPTIONS + FUSED_OPTIONS


def check_option_names(loss_options: dict, caller: str) -> None:
    unknown = sorted(set(loss_options) - set(LOSS_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"{caller}() got unknown loss option(s) {unknown}; the options are {sorted(LOSS_OPTION_NAMES)}"
        )


def check_fused_options(loss_options: dict, caller: str) -> None:
    """Names and values of the loss options, before any kernel: TypeError for an unknown name,
    ValueError naming the option for a bad value."""
    check_option_names(loss_options, caller)
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
        raise ValueError(
            "use_weighting=True (WPO) needs each token's log sum_v p_v^2, which the logits path does not "
            "compute; it will come with fused_linear_dpo_loss. Meanwhile, pass WPO's pair weights "
            "(detached) as pair_weights."
        )


def _check_inputs(policy_logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits, ignore_index, shift,
                  backend, loss_options) -> int:
    """Shapes, dtypes, devices and the reference source, before any kernel; returns B."""
    validation.check_tensor("policy_logits", policy_logits, dims=(3,))
    rows = policy_logits.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"policy_logits must hold 2B rows, chosen [0, B) then rejected [B, 2B), with B >= 1; got {rows} rows"
        )
    batch, device = rows // 2, policy_logits.device
    validation.check_labels(labels, policy_logits.shape[:-1], "policy_logits.shape[:-1]")
    validation.check_same_device("labels", labels, "policy_logits", policy_logits)
    validation.check_int("ignore_index", ignore_index)
    validation.check_bool("shift", shift)
    validation.check_backend_name(backend)

    reference_free = loss_options.get("reference_free", False)
    precomputed = (ref_chosen_logps is not None, ref_rejected_logps is not None)
    if precomputed[0] != precomputed[1]:
        missing = "ref_rejected_logps" if precomputed[0] else "ref_chosen_logps"
        raise ValueError(f"{missing} is None: give both ref_chosen_logps and ref_rejected_logps, or neither")
    if reference_free:
        if ref_logits is not None:
            raise ValueError("ref_logits is given but reference_free=True uses no reference: pass ref_logits=None")
    elif precomputed[0] and ref_logits is not None:
        raise ValueError("give either ref_logits or ref_chosen_logps/ref_rejected_logps, not both")
    elif not precomputed[0] and ref_logits is None:
        raise ValueError(
            "no reference: give ref_chosen_logps and ref_rejected_logps, or ref_logits, or set reference_free=True"
        )
    if precomputed[0] and not reference_free:
        for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            loss_opts.check_pair_tensor(name, value, batch, device, device_of="policy_logits")

    backend_name = resolve_backend(backend, device)
    validation.check_float_dtype("policy_logits", policy_logits, backend_name)
    if ref_logits is not None:
        validation.check_tensor("ref_logits", ref_logits, dims=(3,))
        if ref_logits.shape != policy_logits.shape:
            raise ValueError(
                f"ref_logits must have the shape of policy_logits {tuple(policy_logits.shape)}, "
                f"got {tuple(ref_logits.shape)}"
            )
        validation.check_same_device("ref_logits", ref_logits, "policy_logits", policy_logits)
        validation.check_float_dtype("ref_logits", ref_logits, backend_name)
        validation.check_unit_stride("ref_logits", ref_logits)

    pair_weights = loss_options.get("pair_weights")
    if pair_weights is not None:
        loss_opts.check_pair_tensor("pair_weights", pair_weights, batch, device, device_of="policy_logits")
        loss_types = loss_opts.normalise_loss_types(loss_options.get("loss_type", "sigmoid"))
        loss_opts.check_pair_weights_loss_types(loss_types)
    return batch


def fused_dpo_loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_logits: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    **loss_options,
) -> DPOOutput:
    """DPO-family loss of `B` pairs from the policy logits `[2B, T, V]` (chosen rows `[0, B)`, rejected `[B, 2B)`).

    The policy log-probs come from `dk.sequence_logps` (one fused kernel forward, one backward).
    The reference log-probs are either precomputed (`ref_chosen_logps`, `ref_rejected_logps`, `[B]`,
    used as given, so compute them with the same `ld_alpha`) or computed from `ref_logits` (the
    shape of `policy_logits`) by the same kernel under `torch.no_grad()`: give exactly one source,
    or none with `reference_free=True` (then `ref_logits` is refused: it would be a wasted pass).

    Args:
        labels, ignore_index, shift, backend: as in `dk.sequence_logps`.
        **loss_options: the keyword options of `dk.dpo_loss` (beta, loss_type, loss_weights,
            label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, simpo_gamma,
            reference_free, pair_weights) and:
            ld_alpha: LD-DPO (None: off). For each pair, the first min(chosen, rejected length)
                scored tokens weigh 1 and later ones `ld_alpha`, in the policy and in the
                reference from `ref_logits` alike (TRL 1.16).
            use_weighting: WPO; not available on the logits path (raises ValueError).
        The token counts ipo, sigmoid_norm and sft need are the numbers of scored tokens; sft's
        NLL is the mean over all chosen scored tokens of -log p, unweighted by `ld_alpha` (as TRL).

    Returns `dk.DPOOutput`. Its `metrics` property gives TRL's logged values as floats (one device
    sync when read); `metric_tensors` the same as tensors, without a sync. The call itself never
    syncs beyond `dk.sequence_logps`' label check, so it runs under `torch.compile(fullgraph=True)`.

    Materialised beyond `dk.sequence_logps` (policy, and reference when from logits): `[2B, T]`
    token weights with `ld_alpha`, and `[B]` tensors; nothing of size V.
    """
    check_fused_options(loss_options, "fused_dpo_loss")
    batch = _check_inputs(policy_logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits,
                          ignore_index, shift, backend, loss_options)
    loss_types = loss_opts.normalise_loss_types(loss_options.get("loss_type", "sigmoid"))

    ld_alpha = loss_options.get("ld_alpha")
    token_weights = None
    if ld_alpha is not None:
        weight_dtype = torch.float64 if policy_logits.dtype == torch.float64 else torch.float32
        token_weights = ld_dpo_token_weights(
            labels, float(ld_alpha), ignore_index=ignore_index, shift=shift, dtype=weight_dtype
        )
    # sft takes the unweighted chosen log-probs: with LD-DPO weights they are not the sums in logps
    sft_from_tokens = token_weights is not None and "sft" in loss_types

    policy = sequence_logps(
        policy_logits, labels, ignore_index=ignore_index, shift=shift, token_weights=token_weights,
        return_token_logps=sft_from_tokens, backend=backend,
    )
    chosen_logps, rejected_logps = policy.logps.chunk(2)
    chosen_counts, rejected_counts = policy.num_tokens.chunk(2)
    if ref_logits is not None:
        with torch.no_grad():
            ref = sequence_logps(
                ref_logits, labels, ignore_index=ignore_index, shift=shift, token_weights=token_weights,
                backend=backend,
            )
        ref_chosen_logps, ref_rejected_logps = ref.logps.chunk(2)
    chosen_nll = None
    if sft_from_tokens:
        total = chosen_counts.sum().to(policy.token_logps.dtype).clamp(min=1.0)
        chosen_nll = -policy.token_logps[:batch].sum() / total

    dpo_options = {k: v for k, v in loss_options.items() if k in DPO_LOSS_OPTIONS}
    result = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_num_tokens=chosen_counts, rejected_num_tokens=rejected_counts, chosen_nll=chosen_nll,
        **dpo_options,
    )
    return DPOOutput(
        loss=result.loss,
        losses=result.losses,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=result.chosen_rewards,
        rejected_rewards=result.rejected_rewards,
        metric_tensors=dpo_metric_tensors(
            chosen_logps, rejected_logps, result.chosen_rewards, result.rejected_rewards, result.nll_loss
        ),
    )
