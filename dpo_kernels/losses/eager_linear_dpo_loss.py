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

The block loop (its blocks depend on the token counts, its gradients come from autograd inside
it) is the custom op `dpo_kernels::eager_linear_dpo_gradients`: torch.compile sees one opaque call
with static output shapes (the gradients and the policy's `[2B]` / `[2B, T]` results) and traces
the loss and metrics around it. The loss options travel to it as JSON, `pair_weights` as a tensor.
"""

from __future__ import annotations

import contextlib
import json
from typing import Iterator, List, Optional, Tuple

import torch

from ..linear.linear_sequence_logps import linear_sequence_logps
from ..outputs import DPOOutput, LogpsOutput
from ..sequence_reduction import aligned_targets
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


@contextlib.contextmanager
def _autograd_inside_custom_op() -> Iterator[None]:
    """Autograd recording inside a custom op's implementation, which the dispatcher runs below the
    autograd keys (excluded): they are re-included for the block's own forward and backward."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    keys = torch._C.DispatchKey
    for key in (keys.ADInplaceOrView, keys.AutogradFunctionality, keys.AutogradOther):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


_POLICY_FIELDS = LogpsOutput._fields  # logps, num_tokens, token_logps, entropy, mean_logits, is_top1, log_sum_sq_probs


@torch.library.custom_op("dpo_kernels::eager_linear_dpo_gradients", mutates_args=())
def eager_linear_dpo_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor], ref_rejected_logps: Optional[torch.Tensor],
    token_weights: Optional[torch.Tensor], pair_weights: Optional[torch.Tensor], options: str, extras: str,
    return_token_logps: bool, block_bytes: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias, then the policy's LogpsOutput fields over all 2B rows); a gradient
    not needed and a field not computed are `[0]` tensors. `options`: JSON of {"linear": the
    linear_sequence_logps keywords, "loss": the loss options but pair_weights}."""
    options = json.loads(options)
    loss_options = dict(options["loss"])
    if pair_weights is not None:
        loss_options["pair_weights"] = pair_weights
    linear_options = options["linear"]
    valid = aligned_targets(labels, linear_options["shift"], linear_options["ignore_index"]) != linear_options[
        "ignore_index"]
    with _autograd_inside_custom_op():
        grads, policy = _block_gradients(
            hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, valid=valid,
            token_weights=token_weights, extras=tuple(e for e in extras.split(",") if e),
            return_token_logps=return_token_logps, block_bytes=block_bytes, linear_options=linear_options,
            loss_options=loss_options, need=(need_hidden, need_weight, need_bias and bias is not None))
    empty = hidden.new_empty((0,))
    return (*(empty.clone() if g is None else g for g in grads),
            *(empty.clone() if t is None else t for t in policy))


@eager_linear_dpo_gradients.register_fake
def _eager_linear_dpo_gradients_fake(hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps,
                                     token_weights, pair_weights, options, extras, return_token_logps, block_bytes,
                                     need_hidden, need_weight, need_bias):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows, positions = labels.shape
    wanted = extras.split(",")

    def maybe(present: bool, shape, dtype=acc):
        return hidden.new_empty(shape if present else (0,), dtype=dtype)

    return (maybe(need_hidden, hidden.shape, hidden.dtype), maybe(need_weight, weight.shape, weight.dtype),
            maybe(need_bias and bias is not None, (weight.shape[0],), weight.dtype if bias is None else bias.dtype),
            maybe(True, (rows,)), maybe(True, (rows,), torch.int64), maybe(return_token_logps, (rows, positions)),
            *(maybe(name in wanted, (rows, positions), torch.bool if name == "is_top1" else acc)
              for name in _POLICY_FIELDS[3:]))


def _no_gradient_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _no_gradient(ctx, *grads):
    return (None,) * 15


# the outputs are gradients and detached results: nothing flows back through the op itself
torch.library.register_autograd("dpo_kernels::eager_linear_dpo_gradients", _no_gradient,
                                setup_context=_no_gradient_setup)


@torch.compiler.assume_constant_result
def _encode_options(linear_options: dict, loss_options: dict) -> str:
    """The op's `options` string (JSON); torch.compile runs it while tracing, on the Python
    constants the graph is specialised on."""
    return json.dumps({"linear": linear_options, "loss": loss_options}, default=float)


def eager_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: Optional[torch.Tensor], ref_chosen_logps, ref_rejected_logps, *,
                          valid: torch.Tensor, token_weights: Optional[torch.Tensor], extras: tuple,
                          return_token_logps: bool, block_bytes: int, linear_options: dict,
                          loss_options: dict) -> DPOOutput:
    """See the module docstring. `valid` `[2B, T]`: position-aligned scored tokens; the other
    arguments as `fused_linear_dpo_loss` prepared them (`linear_options`: JSON-serialisable)."""
    options = _encode_options(linear_options, {k: v for k, v in loss_options.items() if k != "pair_weights"})
    outputs = eager_linear_dpo_gradients(
        hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, token_weights,
        loss_options.get("pair_weights"), options, ",".join(extras), return_token_logps, block_bytes,
        hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    dhidden, dweight, dbias = (g if needed else None for g, needed in zip(
        outputs[:3], (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)))
    present = (True, True, return_token_logps) + tuple(name in extras for name in _POLICY_FIELDS[3:])
    policy = LogpsOutput(*(t if keep else None for t, keep in zip(outputs[3:], present)))
    with torch.no_grad():
        result = dpo_output(policy, ref_chosen_logps, ref_rejected_logps, valid=valid, token_weights=token_weights,
                            loss_options=loss_options)
    loss = _LossWithGradients.apply(result.loss, hidden, weight, bias, dhidden, dweight, dbias)
    return result._replace(loss=loss)


def _block_gradients(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                     ref_chosen_logps, ref_rejected_logps, *, valid: torch.Tensor,
                     token_weights: Optional[torch.Tensor], extras: tuple, return_token_logps: bool,
                     block_bytes: int, linear_options: dict, loss_options: dict,
                     need: Tuple[bool, bool, bool]) -> Tuple[tuple, LogpsOutput]:
    """The block loop of the module docstring: ((dhidden, dweight, dbias), each None unless
    `need`ed; the policy's detached LogpsOutput over all 2B rows). `valid` `[2B, T]`:
    position-aligned scored tokens."""
    need_hidden, need_weight, need_bias = need
    batch = hidden.shape[0] // 2
    compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
        hidden.device.type) else hidden.dtype
    bytes_per_token = weight.shape[0] * torch.empty((), dtype=compute_dtype).element_size()
    tokens = valid.sum(dim=1).tolist()
    blocks = pair_blocks([tokens[p] + tokens[batch + p] for p in range(batch)], bytes_per_token, block_bytes)

    weight_leaf = weight.detach().requires_grad_(need_weight)
    bias_leaf = None if bias is None else bias.detach().requires_grad_(need_bias)
    dhidden = torch.zeros_like(hidden) if need_hidden else None
    dweight = dbias = None  # the first block's gradients become the accumulators
    pair_weights = loss_options.get("pair_weights")
    parts = []
    for p0, p1 in blocks:
        rows = _rows(batch, p0, p1).to(hidden.device)
        hidden_block = hidden.detach()[rows].requires_grad_(need_hidden)
        block_weights = None if token_weights is None else token_weights[rows]
        block_options = dict(loss_options)
        if pair_weights is not None:
            block_options["pair_weights"] = pair_weights[p0:p1]
        with torch.enable_grad():
            policy = linear_sequence_logps(
                hidden_block, weight_leaf, labels[rows], bias_leaf, extras=extras, token_weights=block_weights,
                return_token_logps=return_token_logps, cache_budget_bytes=1 << 62, **linear_options)
            out = dpo_output(policy, *(None if ref is None else ref[p0:p1] for ref in (ref_chosen_logps,
                                                                                       ref_rejected_logps)),
                             valid=valid[rows],
                             token_weights=block_weights, loss_options=block_options)
            leaves = [x for x in (hidden_block, weight_leaf, bias_leaf) if x is not None and x.requires_grad]
            grads = iter(torch.autograd.grad(out.loss * ((p1 - p0) / batch), leaves)) if leaves else iter(())
        if need_hidden:
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

    return (dhidden, dweight, dbias), LogpsOutput(*(joined(field) for field in LogpsOutput._fields))
