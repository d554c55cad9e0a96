"""`dk.fused_dpo_loss`: the DPO loss family straight from the policy logits, with the fused
logits-path kernels computing the per-sequence log-probs."""

from __future__ import annotations

from typing import Optional

import torch

from .. import validation
from ..backends.availability import resolve_backend
from ..logits.sequence_logps import sequence_logps
from ..outputs import DPOOutput
from ..sequence_reduction import aligned_targets
from .dpo_from_logps import (
    check_fused_options,
    check_pair_weights,
    check_reference_source,
    dpo_output,
    ld_alpha_weights,
    needs_token_logps,
    policy_extras,
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

    check_reference_source(
        precomputed=(ref_chosen_logps is not None, ref_rejected_logps is not None), source_name="ref_logits",
        source_given=ref_logits is not None, reference_free=loss_options.get("reference_free", False), batch=batch,
        device=device, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        device_of="policy_logits",
    )

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

    check_pair_weights(loss_options, batch, device, device_of="policy_logits")
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
    inplace_backward: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_end: Optional[int] = None,
    **loss_options,
) -> DPOOutput:
    """DPO-family loss of `B` pairs from the policy logits `[2B, T, V]` (chosen rows `[0, B)`, rejected `[B, 2B)`).

    The policy log-probs come from `dk.sequence_logps` (one fused kernel forward, one backward).
    The reference log-probs are either precomputed (`ref_chosen_logps`, `ref_rejected_logps`, `[B]`,
    used as given, so compute them with the same `ld_alpha`) or computed from `ref_logits` (the
    shape of `policy_logits`) by the same kernel under `torch.no_grad()`: give exactly one source,
    or none with `reference_free=True` (then `ref_logits` is refused: it would be a wasted pass).

    Args:
        labels, ignore_index, shift, backend, inplace_backward: as in `dk.sequence_logps`
            (`inplace_backward=True`: backward writes the gradient w.r.t. `policy_logits` into
            their own storage; do not use them afterwards).
        process_group, vocab_start, vocab_end: vocabulary parallelism, as in `dk.sequence_logps`:
            `policy_logits` (and `ref_logits`) are this rank's `[2B, T, V_local]` slice; the loss,
            rewards and metrics are the whole vocabulary's, identical on every rank.
        **loss_options: the keyword options of `dk.dpo_loss` (beta, loss_type, loss_weights,
            label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, simpo_gamma,
            reference_free, pair_weights) and:
            ld_alpha: LD-DPO (None: off). For each pair, the first min(chosen, rejected length)
                scored tokens weigh 1 and later ones `ld_alpha`, in the policy and in the
                reference from `ref_logits` alike (TRL 1.16).
            use_weighting: WPO (TRL 1.16): each pair's losses are multiplied by
                w_chosen * w_rejected, w = exp(mean over the sequence's scored tokens of
                log p(target) - log sum_v p_v^2), detached.
        The token counts ipo, sigmoid_norm and sft need are the numbers of scored tokens; sft's
        NLL is the mean over all chosen scored tokens of -log p, unweighted by `ld_alpha` (as TRL).

    Returns `dk.DPOOutput`. Its `metrics` property gives TRL's logged values as floats (one device
    sync when read), `entropy`, `logits/chosen`, `logits/rejected` and `mean_token_accuracy`
    included (from per-token extras the policy's kernel pass computes alongside the log-probs); `metric_tensors` the same as tensors, without a sync. The call itself never
    syncs beyond `dk.sequence_logps`' label check, so it runs under `torch.compile(fullgraph=True)`.

    Materialised beyond `dk.sequence_logps` (policy, with its extras, and reference when from
    logits): `[2B, T]` token weights with `ld_alpha`, and `[B]` tensors; nothing of size V.
    """
    check_fused_options(loss_options, "fused_dpo_loss")
    validation.check_bool("inplace_backward", inplace_backward)
    _check_inputs(policy_logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits, ignore_index, shift,
                  backend, loss_options)
    weight_dtype = torch.float64 if policy_logits.dtype == torch.float64 else torch.float32
    token_weights = ld_alpha_weights(labels, loss_options, ignore_index=ignore_index, shift=shift, dtype=weight_dtype)
    policy = sequence_logps(
        policy_logits, labels, ignore_index=ignore_index, shift=shift, token_weights=token_weights,
        extras=policy_extras(loss_options), return_token_logps=needs_token_logps(loss_options, token_weights),
        inplace_backward=inplace_backward, backend=backend, process_group=process_group, vocab_start=vocab_start, vocab_end=vocab_end,
    )
    if ref_logits is not None:
        with torch.no_grad():
            ref = sequence_logps(
                ref_logits, labels, ignore_index=ignore_index, shift=shift, token_weights=token_weights,
                backend=backend, process_group=process_group, vocab_start=vocab_start, vocab_end=vocab_end,
            )
        ref_chosen_logps, ref_rejected_logps = ref.logps.chunk(2)
    valid = aligned_targets(labels, shift, ignore_index) != ignore_index
    return dpo_output(policy, ref_chosen_logps, ref_rejected_logps, valid=valid, token_weights=token_weights,
                      loss_options=loss_options)
