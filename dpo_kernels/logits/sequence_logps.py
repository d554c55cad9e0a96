"""`dk.sequence_logps`: per-sequence log-probs from logits with the fused logits-path kernels."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference, validation
from ..backends.availability import resolve_backend
from ..distributed.vocab_parallel_logits import VocabParallelTokenLogps
from ..distributed.vocab_shard import resolve_vocab_shard
from ..outputs import EXTRAS, LogpsOutput
from ..sequence_reduction import aligned_targets, aligned_weights, per_position_outputs, reduce_to_sequences
from .token_logps_op import token_logps, token_logps_extras


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    average: bool = False,
    token_weights: Optional[torch.Tensor] = None,
    extras: Sequence[str] = (),
    return_token_logps: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_end: Optional[int] = None,
) -> LogpsOutput:
    """Sum (or mean) over each sequence of log softmax(logits)[label], fused.

    Args:
        logits: `[S, T, V]` or `[N, V]` (one sequence), fp32/bf16/fp16 (float64 on the CPU backend),
            any strides with unit stride over V. Read in place: never copied, upcast or shifted.
        labels: integer `[S, T]` (or `[N]`): `labels[s, t]` is the target of `logits[s, t]`, or with
            `shift=True` of `logits[s, t - 1]` (Hugging Face unshifted labels). Entries equal to
            `ignore_index` are excluded; every other entry must be in `[0, V)`.
        average: mean over the unmasked tokens instead of the sum.
        token_weights: float multipliers shaped like `labels`, each weighing the log-prob of the
            label at the same index; differentiable.
        extras: any of "entropy" (`-sum_v p_v log p_v`, differentiable), "mean_logits" (mean over
            the vocabulary of the logits), "is_top1" (the target is the argmax, the first one on
            ties, as `argmax` picks), "log_sum_sq_probs" (`log sum_v p_v^2`, what WPO weighs by):
            per-position outputs shaped like `labels`, 0 (False) where masked, as on the linear
            path. The kernels then fold all four in the same single pass over each row (forward
            reads the logits once; backward still reads once and writes once, the entropy's
            gradient included); without extras they run the plain log-sum-exp pass.
        return_token_logps: also return the per-position log-probs (position-aligned, 0 where
            masked); gradients flow through them too.
        inplace_backward: backward writes the logits gradient into the logits' storage instead of
            a new buffer, so no `[S, T, V]` tensor is allocated at all. The logits hold the gradient
            afterwards; do not use them again. (For a leaf tensor's `.grad`, autograd copies the
            gradient anyway; the saving is real for model outputs or with `torch.autograd.grad`.)
            The reference backend ignores it.
        backend: "auto" (Triton on CUDA, the C++ kernel on CPU), "triton", "cuda", "cpu",
            "reference" (the unfused PyTorch computation) or "cuda_emulated" (the CUDA kernels run
            on CPU tensors by their host emulation: slow, for tests; never chosen by "auto").
        process_group: vocabulary parallelism (None: off). `logits` `[..., V_local]` are this
            rank's columns `[vocab_start, vocab_end)` of the full logits (with both None, an even
            split: every rank holds V_local columns, rank r `[r * V_local, (r + 1) * V_local)`);
            labels (global ids) and the other arguments are the same on every rank. Outputs are
            the whole vocabulary's, identical on every rank; every rank must backpropagate the
            same loss. Communication per call: one all-gather of 6 int64 (layout and labels
            check) and all-reduces of 3 * S * T values (8 * S * T with extras; fp32, float64 for
            float64 logits) in forward, nothing in backward (each rank writes its own slice of the logits gradient).

    Materialised: `[S, T]` fp32 token log-probs and log-sum-exps (and with extras `[S, T, 8]`
    statistics and the extras) in forward; in backward the
    logits gradient (none with `inplace_backward`). Nothing else of size `V`.
    A row with no unmasked token has logps 0 and num_tokens 0, with or without `average`.
    """
    validation.check_tensor("logits", logits, dims=(2, 3))
    validation.check_vocab_size("logits", logits)
    validation.check_backend_name(backend)
    validation.check_int("ignore_index", ignore_index)
    for name, flag in (("shift", shift), ("average", average), ("return_token_logps", return_token_logps),
                       ("inplace_backward", inplace_backward)):
        validation.check_bool(name, flag)
    validation.check_labels(labels, logits.shape[:-1], "logits.shape[:-1]")
    validation.check_same_device("labels", labels, "logits", logits)
    validation.check_token_weights(token_weights, labels)
    extras = validation.check_extras(extras)
    validation.check_unit_stride("logits", logits)
    if inplace_backward and 0 in logits.stride()[:-1] and logits.numel() > 0:
        raise ValueError("inplace_backward=True needs logits whose rows do not overlap (a stride is 0)")
    name = resolve_backend(backend, logits.device)
    validation.check_float_dtype("logits", logits, name)
    validation.check_vocab_parallel(process_group, vocab_start, vocab_end, name)
    shard = None
    if process_group is not None:  # collective: every rank agrees on the layout before any work
        shard = resolve_vocab_shard(process_group, vocab_start, vocab_end, logits.shape[-1], labels, holder="logits")
    validation.check_label_range(labels, logits.shape[-1] if shard is None else shard.vocab_size, ignore_index)

    unbatched = logits.dim() == 2
    if unbatched:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
        token_weights = None if token_weights is None else token_weights.unsqueeze(0)

    if name == "reference":
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        int_labels = labels.to(torch.int64)  # torch.gather takes no other index dtype than int32/int64
        ref = reference.sequence_logps(
            logits, int_labels, ignore_index=ignore_index, shift=shift, average=average,
            token_weights=token_weights, compute_dtype=acc,
        )
        per_position = {"token_logps": ref.token_logps}
        if extras:
            ref_extras = reference.token_extras(logits, int_labels, ignore_index=ignore_index, shift=shift,
                                                compute_dtype=acc)
            per_position.update({e: ref_extras[e] for e in extras})
        logps, num_tokens = ref.logps, ref.num_tokens
    else:
        targets = aligned_targets(labels, shift, ignore_index)
        if shard is not None:
            outputs = VocabParallelTokenLogps.apply(logits, targets, ignore_index, shard, name, inplace_backward,
                                                    bool(extras))
            values = dict(zip(("token_logps",) + EXTRAS, outputs))
        elif extras:
            token_logps_, _, *rest = token_logps_extras(logits, targets, ignore_index, name, inplace_backward)
            values = dict(zip(("token_logps",) + EXTRAS, [token_logps_, *rest]))
        else:
            values = {"token_logps": token_logps(logits, targets, ignore_index, name, inplace_backward)[0]}
        per_position = {k: v for k, v in values.items() if k == "token_logps" or k in extras}
        weights = None if token_weights is None else aligned_weights(token_weights, shift, values["token_logps"].dtype)
        logps, num_tokens = reduce_to_sequences(values["token_logps"], targets != ignore_index, weights, average)

    return LogpsOutput(logps=logps, num_tokens=num_tokens,
                       **per_position_outputs(per_position, return_token_logps, unbatched))
