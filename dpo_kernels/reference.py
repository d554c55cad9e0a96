"""The plain PyTorch oracle: what people compute today, written for clarity, not speed.

Every backend of dpo_kernels is tested against these functions run in float64, and the benchmarks
use them (in float32, as trainers do) as the baseline. This module imports nothing from the rest
of the package, so it stays an independent check.

Memory: `token_logps` materialises `log_softmax(logits.to(compute_dtype))`, an `[S, T, V]` tensor in
the compute dtype (plus autograd's copies in backward). That cost is exactly what the fused kernels
remove.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch


class ReferenceLogps(NamedTuple):
    logps: torch.Tensor  # [S] compute dtype
    num_tokens: torch.Tensor  # [S] int64
    token_logps: torch.Tensor  # [S, T] compute dtype, 0 at masked positions


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF-style shift: position t is trained on labels[..., t + 1]; the last position has no target."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """log softmax(logits)[target] per position, 0 where the target is ignore_index.

    `logits` is `[S, T, V]` or `[N, V]`, `labels` its shape without V. With `shift=True` the target
    of position t is labels[..., t + 1] (HF-style unshifted labels). Differentiable.
    """
    targets = shift_labels(labels, ignore_index) if shift else labels
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = torch.log_softmax(logits.to(compute_dtype), dim=-1)
    picked = logprobs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    average: bool = False,
    token_weights: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> ReferenceLogps:
    """Per-sequence sums (or means over unmasked tokens) of weighted token log-probs.

    A 2-D `[N, V]` input is one sequence (logps `[1]`, token_logps `[N]`). `token_weights` is shaped like `labels` and weighs the
    log-prob of the label at the same index (so with `shift=True`, position t is weighted by
    token_weights[..., t + 1]). A sequence with no unmasked token gets logps 0 and num_tokens 0.
    """
    unbatched = logits.dim() == 2
    if unbatched:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
        token_weights = None if token_weights is None else token_weights.unsqueeze(0)
    per_token = token_logps(logits, labels, ignore_index=ignore_index, shift=shift, compute_dtype=compute_dtype)
    targets = shift_labels(labels, ignore_index) if shift else labels
    valid = targets != ignore_index
    weighted = per_token
    if token_weights is not None:
        weights = shift_labels(token_weights, 0) if shift else token_weights
        weighted = per_token * torch.where(valid, weights.to(compute_dtype), torch.zeros_like(per_token))
    num_tokens = valid.sum(-1)
    logps = weighted.sum(-1)
    if average:
        logps = logps / num_tokens.clamp(min=1).to(compute_dtype)
    return ReferenceLogps(logps=logps, num_tokens=num_tokens, token_logps=per_token[0] if unbatched else per_token)


def token_extras(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Dict[str, torch.Tensor]:
    """The per-token extras of `[..., V]` logits (labels and `shift` as in `token_logps`), from the
    full log-softmax in `compute_dtype`, by name as in ReferenceLinearLogps (0 / False where
    masked). Differentiable (entropy, mean_logits, log_sum_sq_probs)."""
    targets = shift_labels(labels, ignore_index) if shift else labels
    valid = targets != ignore_index
    z = logits.to(compute_dtype)
    logprobs = torch.log_softmax(z, dim=-1)
    probs = logprobs.exp()
    zero = torch.zeros((), dtype=compute_dtype, device=z.device)
    return dict(
        entropy=torch.where(valid, -(probs * logprobs).sum(-1), zero),
        mean_logits=torch.where(valid, z.mean(-1), zero),
        is_top1=valid & (z.argmax(dim=-1) == targets),
        log_sum_sq_probs=torch.where(valid, torch.logsumexp(2 * logprobs, dim=-1), zero),
    )


# --------------------------------------------------------------------------------------------
# Linear path: from hidden states and the lm_head weight, through the full logits


class ReferenceLinearLogps(NamedTuple):
    logps: torch.Tensor  # [S] compute dtype
    num_tokens: torch.Tensor  # [S] int64
    token_logps: torch.Tensor  # [S, T] compute dtype, 0 at masked positions
    entropy: torch.Tensor  # [S, T] -sum_v p_v log p_v, 0 at masked positions
    mean_logits: torch.Tensor  # [S, T] mean over the vocabulary of the logits, 0 at masked positions
    is_top1: torch.Tensor  # [S, T] bool: the target is the (first) argmax; False at masked positions
    log_sum_sq_probs: torch.Tensor  # [S, T] log sum_v p_v^2, 0 at masked positions


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The full `[..., V]` logits `z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature`,
    with `softcap(u) = softcap * tanh(u / softcap)` (Gemma-2) when `softcap` is given."""
    z = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        z = z + bias.to(compute_dtype)
    z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z / temperature


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    average: bool = False,
    token_weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> ReferenceLinearLogps:
    """`sequence_logps` of `linear_logits(...)`, plus the per-token extras over the full logits.

    `hidden` is `[S, T, H]` or `[N, H]` (one sequence). Materialises the `[S, T, V]` logits in the
    compute dtype, their log-softmax and probabilities. Differentiable in every float input.
    """
    unbatched = hidden.dim() == 2
    if unbatched:
        hidden, labels = hidden.unsqueeze(0), labels.unsqueeze(0)
        token_weights = None if token_weights is None else token_weights.unsqueeze(0)
    z = linear_logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                      compute_dtype=compute_dtype)
    ref = sequence_logps(z, labels, ignore_index=ignore_index, shift=shift, average=average,
                         token_weights=token_weights, compute_dtype=compute_dtype)
    extras = token_extras(z, labels, ignore_index=ignore_index, shift=shift, compute_dtype=compute_dtype)
    per_token = {"token_logps": ref.token_logps, **extras}
    if unbatched:
        per_token = {name: t[0] for name, t in per_token.items()}
    return ReferenceLinearLogps(logps=ref.logps, num_tokens=ref.num_tokens, **per_token)
