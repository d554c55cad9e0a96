"""Triton kernels of the logits path: per-token log-probs (forward) and the logits gradient; the
launchers' contract is in token_logps_launch.py.

Forward: one program per token row streams the vocabulary in BLOCK_V chunks with an online
log-sum-exp in fp32 (a running max and a vector of rescaled partial sums: one exp per logit) and
reads the target logit; it writes the token log-prob and the row's log-sum-exp as the pair
(max, log of the sum of exp(x - max)) (12 bytes a row; one fp32 lse would lose 1e-3 at logits near
1e4). With extras (a constexpr flag) the same pass is the tile fold's (triton_tile_epilogues.fold_row)
and the program writes the row's 8 statistics instead. Masked rows read nothing. Backward: a grid of (row, vocabulary span) programs, each reading its
logits once and writing `g * (onehot - exp((x - max) - log_sum))` once, into a fresh buffer or into the logits'
own storage, less `ge * p * (log p + H)` when the entropy's gradient is given. Nothing `[N, V]`-sized is allocated here besides the gradient the caller passes in.
Offsets are 64-bit. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .availability import triton_interpreting
from .token_logps_launch import ForwardBuffers, run_backward, run_forward
from .triton_tile_epilogues import fold_row


@triton.jit
def _token_logps_forward_kernel(
    logits_ptr, stride_s, stride_t, T, V,
    targets_ptr, ignore_index,
    token_logps_ptr, row_stats_ptr, stats_ptr,
    BLOCK_V: tl.constexpr, EXTRAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = row // T
    t = row - s * T
    row_ptr = logits_ptr + s * stride_s + t * stride_t
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    v_end = tl.where(valid, V, 0)

    if EXTRAS:
        # the statistics of the whole row (masked rows: n = 0, the empty set), TileStats order
        m, sum_exp, centered, sum_sq, sum_logits, before, after = fold_row(
            row_ptr, v_end, target, 1.0, 1.0, False, True, True, True, True, True, BLOCK_V)
        in_range = (target >= 0) & (target < V)
        target_logit = tl.load(row_ptr + target, mask=valid & in_range, other=0.0).to(tl.float32)
        target_logit = tl.where(valid & ~in_range, float("nan"), target_logit)
        out = stats_ptr + 8 * row
        tl.store(out, m)
        tl.store(out + 1, sum_exp)
        tl.store(out + 2, target_logit)
        tl.store(out + 3, centered)
        tl.store(out + 4, sum_sq)
        tl.store(out + 5, sum_logits)
        tl.store(out + 6, before)
        tl.store(out + 7, after)
    else:
        offsets = tl.arange(0, BLOCK_V)
        running_max = tl.full([], -float("inf"), tl.float32)
        partial_sums = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, v_end, BLOCK_V):
            cols = v0 + offsets
            x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # An all -inf prefix keeps new_max at -inf; shift by 0 then, so no exp(-inf + inf) occurs.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            partial_sums = partial_sums * tl.exp(running_max - shift) + tl.exp(x - shift)
            running_max = new_max
        total = tl.sum(partial_sums, axis=0)
        # An all -inf row keeps max = log_sum = -inf (its log-prob is NaN, as log_softmax gives).
        log_sum = tl.log(tl.where(valid, total, 1.0))  # masked rows: no log(0)

        in_range = (target >= 0) & (target < V)
        target_logit = tl.load(row_ptr + target, mask=valid & in_range, other=0.0).to(tl.float32)
        # A label outside [0, V) (possible only when validation was skipped, e.g. under torch.compile)
        # yields NaN rather than a silently wrong number.
        token_logp = tl.where(in_range, (target_logit - running_max) - log_sum, float("nan"))
        tl.store(token_logps_ptr + row, tl.where(valid, token_logp, 0.0))
        tl.store(row_stats_ptr + 2 * row, tl.where(valid, running_max, 0.0))
        tl.store(row_stats_ptr + 2 * row + 1, tl.where(valid, log_sum, 0.0))


@triton.jit
def _token_logps_backward_kernel(
    logits_ptr, stride_s, stride_t,
    out_ptr, out_stride_s, out_stride_t,
    T, V,
    targets_ptr, ignore_index,
    row_stats_ptr, grad_ptr, entropy_grad_ptr, entropy_ptr,
    SPAN: tl.constexpr, BLOCK_V: tl.constexpr, HAS_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    span_start = tl.program_id(1).to(tl.int64) * SPAN
    s = row // T
    t = row - s * T
    row_ptr = logits_ptr + s * stride_s + t * stride_t
    out_row_ptr = out_ptr + s * out_stride_s + t * out_stride_t
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    g = tl.where(valid, tl.load(grad_ptr + row), 0.0)
    row_max = tl.load(row_stats_ptr + 2 * row)
    log_sum = tl.load(row_stats_ptr + 2 * row + 1)
    if HAS_ENTROPY:
        ge = tl.where(valid, tl.load(entropy_grad_ptr + row), 0.0)
        H = tl.load(entropy_ptr + row)
    # Masked rows read nothing (x = -inf, so prob = 0 and g = 0) and store zeros.
    read_end = tl.where(valid, V, 0)

    offsets = tl.arange(0, BLOCK_V)
    for v0 in range(0, SPAN, BLOCK_V):
        cols = span_start + v0 + offsets
        x = tl.load(row_ptr + cols, mask=cols < read_end, other=-float("inf")).to(tl.float32)
        logp = (x - row_max) - log_sum
        prob = tl.exp(logp)
        dlogits = g * (tl.where(cols == target, 1.0, 0.0) - prob)
        if HAS_ENTROPY:
            dlogits -= ge * (prob * tl.where(prob == 0.0, 0.0, logp + H))  # p log p is 0 where p is 0
        tl.store(out_row_ptr + cols, dlogits.to(out_ptr.dtype.element_ty), mask=cols < V)


def _block_v(V: int) -> int:
    # The interpreter executes blocks as numpy arrays: keep them small so that tests at small V
    # still walk several chunks.
    cap = 256 if triton_interpreting() else 4096
    return min(triton.next_power_of_2(V), cap)


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, extras: bool = False):
    S, T, V = logits.shape
    block_v = _block_v(V)

    def launch(out: ForwardBuffers) -> None:
        _token_logps_forward_kernel[(S * T,)](
            logits, logits.stride(0), logits.stride(1), T, V,
            targets, ignore_index,
            out.token_logps, out.row_stats, out.stats,
            BLOCK_V=block_v, EXTRAS=extras,
            num_warps=8 if block_v >= 2048 else 4,
        )

    return run_forward(logits, extras, launch)


def backward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, row_stats: torch.Tensor,
             grad: torch.Tensor, out: torch.Tensor, entropy_grad: Optional[torch.Tensor] = None,
             entropy: Optional[torch.Tensor] = None) -> None:
    S, T, V = logits.shape
    block_v = _block_v(V)
    span = block_v * max(1, min(4, triton.cdiv(V, block_v)))

    def launch() -> None:
        _token_logps_backward_kernel[(S * T, triton.cdiv(V, span))](
            logits, logits.stride(0), logits.stride(1),
            out, out.stride(0), out.stride(1),
            T, V,
            targets, ignore_index,
            row_stats, grad, entropy_grad, entropy,
            SPAN=span, BLOCK_V=block_v, HAS_ENTROPY=entropy_grad is not None,
            num_warps=8 if block_v >= 2048 else 4,
        )

    run_backward(logits, launch)
