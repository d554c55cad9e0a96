"""`fused_linear_dpo_loss(..., eager_backward=True)`: the gradients computed during forward, a block
of pairs at a time, so that no logits tile is ever computed twice.

The default linear path keeps one `[N, chunk]` tile and recomputes it in backward: `8 N H V` FLOPs.
Per-pair loss types let the loss's gradient be known as soon as one pair's log-probs are: each
block of pairs runs the linear path with its tiles cached (`[N_block, V]`), takes the block's share
of the loss, and runs its backward at once from the cached tiles (`6 N H V` FLOPs in all). The
gradients w.r.t. hidden, weight and bias are accumulated across blocks; the returned `loss`'s
backward only scales them by the incoming gradient.

Materialised beyond the default path: one block's tiles (`N_block * V` elements of the compute
dtype; a block is the largest run of consecutive pairs whose tiles fit `block_bytes`, at least one
pair), one block's `dweight` while it is added to the sum, and the gradients themselves (`dweight`
accumulated in the weight's dtype, in place, so with 16-bit weights each block's contribution is
rounded once). Only `loss` is differentiable: the
other fields of the output are detached. Not for loss types that couple pairs (`aot`,
`aot_unpaired` sort over the batch; `sft` averages over the batch's tokens): those raise.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..linear.linear_sequence_logps import linear_sequence_logps
from ..outputs import DPOOutput, LogpsOutput
from . import options as loss_opts
from .dpo_from_logps import dpo_output

COUPLED_LOSS_TYPES = frozenset({"aot", "aot_unpaired", "sft"})


def check_eager_backward(loss_options: dict) -> None:
    coupled = sorted(set(loss_opts.normalise_loss_types(loss_options.get("loss_type", "sigmoid")))
                     & COUPLED_LOSS_TYPES)
    if coupled:
        raise ValueError(f"eager_backward=True needs loss types whose loss is a mean over pairs; {coupled} couple the "
                         "pairs of a batch (aot sorts over it, sft averages over its tokens)")


def pair_blocks(pair_tokens: List[int], bytes_per_token: int, block_bytes: int) -> List[Tuple[int, int]]:
    """[p0, p1) runs of consecutive pairs whose tiles (`tokens * bytes_per_token`) fit `block_bytes`;
    a pair that alone exceeds it is a block of its own."""
    blocks, start, used = [], 0, 0
    for p, tokens in enumerate(pair_tokens):
        need = tokens * bytes_per_token
        if p > start and used + need > block_bytes:
            blocks.append((start, p))
            start, used = p, 0
        used += need
    blocks.append((start, len(pair_tokens)))
    return blocks


class _LossWithGradients(torch.autograd.Function):
    """`loss` (a detached value) whose backward returns precomputed gradients times the incoming one."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, dhidden, dweight, dbias):
        ctx.grads = (dhidden, dweight, dbias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # ours alone: scaled in place, handed over, no copy
        for g in grads:
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return (None, *grads, None, None, None)


def _accumulate(total: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total.add_(part)


def _rows(batch: int, p0: int, p1: int) -> torch.Tensor:
    return torch.cat([torch.arange(p0, p1), torch.arange(batch + p0, batch + p1)])


def eager_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: Optional[torch.Tensor], ref_chosen_logps, ref_rejected_logps, *,
                          valid: torch.Tensor, token_weights: Optional[torch.Tensor], extras: tuple,
                          return_token_logps: bool, block_bytes: int, linear_options: dict,
                          loss_options: dict) -> DPOOutput:
    """See the module docstring. `valid` `[2B, T]`: position-aligned scored tokens; the other
    arguments as `fused_linear_dpo_loss` prepared them."""
    batch = hidden.shape[0] // 2
    compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
        hidden.device.type) else hidden.dtype
    bytes_per_token = weight.shape[0] * torch.empty((), dtype=compute_dtype).element_size()
    tokens = valid.sum(dim=1).tolist()
    blocks = pair_blocks([tokens[p] + tokens[batch + p] for p in range(batch)], bytes_per_token, block_bytes)

    weight_leaf = weight.detach().requires_grad_(weight.requires_grad)
    bias_leaf = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
    dhidden = torch.zeros_like(hidden) if hidden.requires_grad else None
    dweight = dbias = None  # the first block's gradients become the accumulators
    pair_weights = loss_options.get("pair_weights")
    parts = []
    for p0, p1 in blocks:
        rows = _rows(batch, p0, p1).to(hidden.device)
        hidden_block = hidden.detach()[rows].requires_grad_(hidden.requires_grad)
        block_weights = None if token_weights is None else token_weights[rows]
        block_options = dict(loss_options)
        if pair_weights is not None:
            block_options["pair_weights"] = pair_weights[p0:p1]
        with torch.enable_grad():
            policy = linear_sequence_logps(
                hidden_block, weight_leaf, labels[rows], bias_leaf, extras=extras, token_weights=block_weights,
                return_token_logps=return_token_logps, cache_budget_bytes=1 << 62, **linear_options)
            out = dpo_output(policy, ref_chosen_logps[p0:p1], ref_rejected_logps[p0:p1], valid=valid[rows],
                             token_weights=block_weights, loss_options=block_options)
            leaves = [x for x in (hidden_block, weight_leaf, bias_leaf) if x is not None and x.requires_grad]
            grads = iter(torch.autograd.grad(out.loss * ((p1 - p0) / batch), leaves)) if leaves else iter(())
        if hidden.requires_grad:
            dhidden[rows] = next(grads).to(dhidden.dtype)
        if weight_leaf.requires_grad:
            dweight = _accumulate(dweight, next(grads))
        if bias_leaf is not None and bias_leaf.requires_grad:
            dbias = _accumulate(dbias, next(grads))
        parts.append(LogpsOutput(*(None if t is None else t.detach() for t in policy)))
        del grads, policy, out  # this block's gradients and graph are freed before the next block

    def joined(field):
        pieces = [getattr(part, field) for part in parts]
        if pieces[0] is None:
            return None
        half = [piece.shape[0] // 2 for piece in pieces]
        return torch.cat([p[:h] for p, h in zip(pieces, half)] + [p[h:] for p, h in zip(pieces, half)])

    policy = LogpsOutput(*(joined(field) for field in LogpsOutput._fields))
    with torch.no_grad():
        result = dpo_output(policy, ref_chosen_logps, ref_rejected_logps, valid=valid, token_weights=token_weights,
                            loss_options=loss_options)
    loss = _LossWithGradients.apply(result.loss, hidden, weight, bias, dhidden, dweight, dbias)
    return result._replace(loss=loss)
