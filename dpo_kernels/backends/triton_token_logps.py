"""Triton kernels of the logits path: per-token log-probs (forward) and the logits gradient.

Forward: one program per token row streams the vocabulary in BLOCK_V chunks with an online
log-sum-exp in fp32 (a running max and a vector of rescaled partial sums: one exp per logit) and
reads the target logit; it writes the token log-prob and the row's log-sum-exp as the pair
(max, log of the sum of exp(x - max)) (12 bytes a row; one fp32 lse would lose 1e-3 at logits near
1e4). Masked rows read nothing. Backward: a grid of (row, vocabulary span) programs, each reading its
logits once and writing `g * (onehot - exp((x - max) - log_sum))` once, into a fresh buffer or into the logits'
own storage. Nothing `[N, V]`-sized is allocated here besides the gradient the caller passes in.
Offsets are 64-bit. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .availability import triton_interpreting


@triton.jit
def _token_logps_forward_kernel(
    logits_ptr, stride_s, stride_t, T, V,
    targets_ptr, ignore_index,
    token_logps_ptr, row_stats_ptr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = row // T
    t = row - s * T
    row_ptr = logits_ptr + s * stride_s + t * stride_t
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    v_end = tl.where(valid, V, 0)

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
    row_stats_ptr, grad_ptr,
    SPAN: tl.constexpr, BLOCK_V: tl.constexpr,
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
    # Masked rows read nothing (x = -inf, so prob = 0 and g = 0) and store zeros.
    read_end = tl.where(valid, V, 0)

    offsets = tl.arange(0, BLOCK_V)
    for v0 in range(0, SPAN, BLOCK_V):
        cols = span_start + v0 + offsets
        x = tl.load(row_ptr + cols, mask=cols < read_end, other=-float("inf")).to(tl.float32)
        prob = tl.exp((x - row_max) - log_sum)
        dlogits = g * (tl.where(cols == target, 1.0, 0.0) - prob)
        tl.store(out_row_ptr + cols, dlogits.to(out_ptr.dtype.element_ty), mask=cols < V)


def _block_v(V: int) -> int:
    # The interpreter executes blocks as numpy arrays: keep them small so that tests at small V
    # still walk several chunks.
    cap = 256 if triton_interpreting() else 4096
    return min(triton.next_power_of_2(V), cap)


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """token_logps fp32 `[S, T]` and row_stats fp32 `[S, T, 2]` (row max, log of the sum of
    exp(x - max)), for `[S, T, V]` logits (unit stride over V) and int64 contiguous `[S, T]`
    targets already aligned with the logits rows."""
    S, T, V = logits.shape
    token_logps = torch.empty((S, T), dtype=torch.float32, device=logits.device)
    row_stats = torch.empty((S, T, 2), dtype=torch.float32, device=logits.device)
    if S * T == 0:
        return token_logps, row_stats
    block_v = _block_v(V)
    _token_logps_forward_kernel[(S * T,)](
        logits, logits.stride(0), logits.stride(1), T, V,
        targets, ignore_index,
        token_logps, row_stats,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return token_logps, row_stats


def backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    row_stats: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Writes the logits gradient into `out` (shaped like the logits, unit stride over V; may be
    the logits themselves). `row_stats` (from `forward`), `grad` (`[S, T]`): fp32 contiguous."""
    S, T, V = logits.shape
    if S * T == 0:
        return
    block_v = _block_v(V)
    span = block_v * max(1, min(4, triton.cdiv(V, block_v)))
    grid = (S * T, triton.cdiv(V, span))
    _token_logps_backward_kernel[grid](
        logits, logits.stride(0), logits.stride(1),
        out, out.stride(0), out.stride(1),
        T, V,
        targets, ignore_index,
        row_stats, grad,
        SPAN=span, BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
