"""Shared helpers of the DPO-loss tests: random preference batches over full logits, and the
full-logits float64 oracle of `dk.fused_dpo_loss` (dk.reference log-probs + `dk.dpo_loss`, with
LD-DPO's token weights worked out here by a plain loop, independently of the package's)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

import dpo_kernels as dk


class PrefBatch(NamedTuple):
    logits: torch.Tensor  # [2B, T, V]
    ref_logits: torch.Tensor  # [2B, T, V]
    labels: torch.Tensor  # [2B, T]
    ref_chosen: torch.Tensor  # [B] precomputed reference log-probs (arbitrary values)
    ref_rejected: torch.Tensor


def make_pref_batch(B: int, T: int, V: int, *, seed: int, dtype=torch.float64, shift: bool = True,
                    ignore_index: int = -100, empty_row: bool = False) -> PrefBatch:
    """Labels with a prompt (1 to T/2 tokens) and right padding, so that chosen and rejected
    lengths differ; every row scores at least one token unless `empty_row` (then row 1 scores none)."""
    gen = torch.Generator().manual_seed(seed)
    S = 2 * B
    idx = torch.arange(T)
    prompt = torch.randint(1, max(2, T // 2), (S,), generator=gen)
    end = torch.randint(T - T // 3, T + 1, (S,), generator=gen)
    end = torch.maximum(end, prompt + 1 + int(shift))  # at least one scored target
    keep = (idx >= prompt[:, None]) & (idx < end[:, None])
    if empty_row:
        keep[1] = False
    labels = torch.randint(0, V, (S, T), generator=gen)
    labels = torch.where(keep, labels, torch.full_like(labels, ignore_index))
    logits = (torch.randn(S, T, V, generator=gen, dtype=torch.float64) * 2).to(dtype)
    ref_logits = (logits.double() + torch.randn(S, T, V, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    ref = -torch.rand(S, generator=gen, dtype=torch.float64) * 5 * T
    return PrefBatch(logits, ref_logits, labels, ref[:B].to(dtype), ref[B:].to(dtype))


def ld_weights_by_loop(labels: torch.Tensor, ld_alpha: float, *, shift: bool, ignore_index: int) -> torch.Tensor:
    """Label-aligned LD-DPO weights, one token at a time: within each pair, the first
    min(chosen, rejected) scored tokens weigh 1, later ones ld_alpha."""
    S, T = labels.shape
    B = S // 2
    scored = [[bool(labels[s, t] != ignore_index) and not (shift and t == 0) for t in range(T)] for s in range(S)]
    lengths = [sum(row) for row in scored]
    weights = torch.ones(S, T, dtype=torch.float64)
    for s in range(S):
        shared = min(lengths[s % B], lengths[s % B + B])
        seen = 0
        for t in range(T):
            if scored[s][t]:
                seen += 1
                if seen > shared:
                    weights[s, t] = ld_alpha
    return weights


def oracle_fused_dpo_loss(
    logits64: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logits64: Optional[torch.Tensor] = None,
    ref_chosen: Optional[torch.Tensor] = None,
    ref_rejected: Optional[torch.Tensor] = None,
    shift: bool = False,
    ignore_index: int = -100,
    ld_alpha: Optional[float] = None,
    **dpo_options,
):
    """(DPOLossOutput, chosen_logps, rejected_logps) from full float64 log-softmaxes."""
    B = logits64.shape[0] // 2
    weights = None if ld_alpha is None else ld_weights_by_loop(labels, ld_alpha, shift=shift, ignore_index=ignore_index)
    kw = dict(ignore_index=ignore_index, shift=shift, compute_dtype=torch.float64)
    policy = dk.reference.sequence_logps(logits64, labels, token_weights=weights, **kw)
    if ref_logits64 is not None:
        with torch.no_grad():
            ref = dk.reference.sequence_logps(ref_logits64, labels, token_weights=weights, **kw).logps
        ref_chosen, ref_rejected = ref[:B], ref[B:]
    counts = policy.num_tokens
    unweighted_chosen = dk.reference.sequence_logps(logits64[:B], labels[:B], **kw).logps
    chosen_nll = -unweighted_chosen.sum() / counts[:B].sum().clamp(min=1)
    out = dk.dpo_loss(policy.logps[:B], policy.logps[B:], ref_chosen, ref_rejected,
                      chosen_num_tokens=counts[:B], rejected_num_tokens=counts[B:], chosen_nll=chosen_nll,
                      **dpo_options)
    return out, policy.logps[:B], policy.logps[B:]
