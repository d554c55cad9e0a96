"""`dk.fused_linear_dpo_loss`: the DPO loss family straight from the last hidden states and the
lm_head weight, through the linear path (no `[2B, T, V]` logits anywhere, policy or reference)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import validation
from ..linear.linear_sequence_logps import linear_sequence_logps
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
from .eager_linear_dpo_loss import check_eager_backward, eager_linear_dpo_loss


def _check_inputs(hidden, weight, labels, bias, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight,
                  ref_bias, loss_options) -> int:
    validation.check_tensor("hidden", hidden, dims=(3,))
    rows = hidden.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"hidden must hold 2B rows, chosen [0, B) then rejected [B, 2B), with B >= 1; got {rows} rows")
    batch = rows // 2
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        name = "ref_weight" if ref_weight is not None else "ref_bias"
        raise ValueError(f"{name} is given without ref_hidden: the reference's lm_head needs its hidden states")
    check_reference_source(
        precomputed=(ref_chosen_logps is not None, ref_rejected_logps is not None), source_name="ref_hidden",
        source_given=ref_hidden is not None, reference_free=loss_options.get("reference_free", False), batch=batch,
        device=hidden.device, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        device_of="hidden",
    )
    if ref_hidden is not None:
        validation.check_tensor("ref_hidden", ref_hidden, dims=(3,))
        if ref_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"ref_hidden must be [2B, T, H_ref] with [2B, T] = {tuple(hidden.shape[:2])}, "
                             f"got {tuple(ref_hidden.shape)}")
        ref_w = weight if ref_weight is None else ref_weight
        if ref_w.dim() != 2 or ref_w.shape[0] != weight.shape[0] or ref_w.shape[1] != ref_hidden.shape[-1]:
            raise ValueError(f"ref_weight must be [V, H_ref] = [{weight.shape[0]}, {ref_hidden.shape[-1]}], "
                             f"got {tuple(ref_w.shape)}")
    check_pair_weights(loss_options, batch, hidden.device, device_of="hidden")
    return batch


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    cache_budget_bytes: int = 0,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_end: Optional[int] = None,
    reduce_hidden_grad: bool = True,
    eager_backward: bool = False,
    **loss_options,
) -> DPOOutput:
    """DPO-family loss of `B` pairs from the policy's last hidden states `[2B, T, H]` (chosen rows
    `[0, B)`, rejected `[B, 2B)`) and its lm_head `weight` `[V, H]` (and `bias`).

    The policy log-probs come from `dk.linear_sequence_logps` (chunked GEMMs + fused epilogues;
    one backward through them). The reference log-probs are precomputed (`ref_chosen_logps`,
    `ref_rejected_logps`, `[B]`), or computed from `ref_hidden` with `ref_weight` / `ref_bias`
    (default: the policy's `weight` / `bias`, e.g. a shared lm_head) by the same path under
    `torch.no_grad()`, or absent with `reference_free=True`.

    Args:
        labels, ignore_index, shift: as in `dk.sequence_logps`.
        temperature, logit_scale, softcap, chunk_size, cache_budget_bytes, backend: as in
            `dk.linear_sequence_logps`; the transforms apply to policy and reference alike.
        process_group, vocab_start, vocab_end, reduce_hidden_grad: vocabulary parallelism, as in
            `dk.linear_sequence_logps`: `weight` / `bias` (and `ref_weight` / `ref_bias`) are this
            rank's rows of the vocabulary; the reference is computed over the same group and range.
            The loss, rewards and metrics are the whole vocabulary's, identical on every rank.
        **loss_options: those of `dk.fused_dpo_loss`, plus
            use_weighting: WPO (TRL 1.16): each pair's losses are multiplied by
                w_chosen * w_rejected, w = exp(mean over the sequence's scored tokens of
                log p(target) - log sum_v p_v^2), detached.

    Returns `dk.DPOOutput`; beyond the logits path's metrics it carries TRL's `entropy`,
    `logits/chosen`, `logits/rejected` and `mean_token_accuracy` (from per-token extras the
    epilogues compute alongside the log-probs).

    eager_backward: compute the gradients during forward, a block of pairs at a time from cached
        tiles, instead of recomputing every tile in backward: `6 N H V` FLOPs instead of `8 N H V`,
        for one block's `[N_block, V]` tiles of memory (a block: consecutive pairs whose tiles fit
        `cache_budget_bytes`, at least one pair). Only `loss` is then differentiable. Needs loss
        types that are means over pairs (not aot, aot_unpaired, sft) and no `process_group`.
        See eager_linear_dpo_loss.py.

    Materialised: what `dk.linear_sequence_logps` materialises (one `[N_valid, chunk]` tile,
    `O(N_valid * H)`, the gradients), plus `[2B, T]` and `[B]` tensors; nothing of size `N * V`.
    """
    check_fused_options(loss_options, "fused_linear_dpo_loss")
    _check_inputs(hidden, weight, labels, bias, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias,
                  loss_options)
    validation.check_int("ignore_index", ignore_index)
    validation.check_bool("shift", shift)
    validation.check_bool("eager_backward", eager_backward)
    if eager_backward:
        check_eager_backward(loss_options)
        if process_group is not None:
            raise ValueError("eager_backward=True is not available with process_group (vocabulary parallelism)")
    weight_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    token_weights = ld_alpha_weights(labels, loss_options, ignore_index=ignore_index, shift=shift, dtype=weight_dtype)
    extras = policy_extras(loss_options)
    linear_options = dict(ignore_index=ignore_index, shift=shift, temperature=temperature, logit_scale=logit_scale,
                          softcap=softcap, chunk_size=chunk_size, backend=backend, token_weights=token_weights,
                          process_group=process_group, vocab_start=vocab_start, vocab_end=vocab_end)
    if ref_hidden is not None:
        with torch.no_grad():
            ref = linear_sequence_logps(
                ref_hidden, weight if ref_weight is None else ref_weight, labels,
                (bias if ref_weight is None else None) if ref_bias is None else ref_bias, **linear_options,
            )
        ref_chosen_logps, ref_rejected_logps = ref.logps.chunk(2)
    valid = aligned_targets(labels, shift, ignore_index) != ignore_index
    return_token_logps = needs_token_logps(loss_options, token_weights)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if eager_backward and wants_grad:
        eager_options = {k: v for k, v in linear_options.items()
                         if k not in ("token_weights", "process_group", "vocab_start", "vocab_end")}
        return eager_linear_dpo_loss(
            hidden, weight, labels, bias, ref_chosen_logps, ref_rejected_logps, valid=valid,
            token_weights=token_weights, extras=extras, return_token_logps=return_token_logps,
            block_bytes=cache_budget_bytes, linear_options=eager_options, loss_options=loss_options)
    policy = linear_sequence_logps(
        hidden, weight, labels, bias, extras=extras, cache_budget_bytes=cache_budget_bytes,
        return_token_logps=return_token_logps, reduce_hidden_grad=reduce_hidden_grad, **linear_options,
    )
    return dpo_output(policy, ref_chosen_logps, ref_rejected_logps, valid=valid, token_weights=token_weights,
                      loss_options=loss_options)
