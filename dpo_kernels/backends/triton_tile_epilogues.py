"""Triton tile epilogues of the linear path (contract: backends/tile_epilogue.py).

fold_tile: one program per tile row. It streams the row's `chunk` entries in BLOCK-wide blocks
(reading each once, in the tile dtype), forms z from y with the logit transform in fp32, and keeps
an online max plus vectors of max-relative partial sums (sum_exp, and when tracked centered and
sum_sq, rescaled like csrc/common/softmax_moments.h whenever the max grows), plus the tracked plain
sums / maxima (sum_logits, max before / after the target). At the end it reads the row's running
statistics, merges the chunk's into them and writes them back (one program per row: no atomics,
deterministic); the chunk holding the row's target also writes `target_logit`. Each untracked
statistic is a constexpr flag (the lean kernel, with all of them off, carries no extra work).

tile_logits_grad_: a grid of (tile row, span of the chunk) programs; each reads its span of the
tile once, computes the gradient w.r.t. y in fp32 from the row's (max, log_sum) pair (the log-prob
as `(z - max) - log_sum`, never through a rounded log-sum-exp) and overwrites the span in the tile
dtype. Rows whose gradient and entropy gradient are both 0 are written as zeros without reading
the tile row or its row_stats (masked loads).

Reads: the tile, targets and the per-row arrays; writes: the per-row statistics (fold) or the tile
itself (grad). Nothing tile-sized is allocated. Tiles are fp32, bf16 or fp16 (float64 tiles are a
CPU-backend feature); statistics and per-row inputs are fp32. Row offsets are 64-bit. Runs on CUDA
tensors (current stream of the tile's device), and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .availability import triton_interpreting
from .tile_epilogue import LogitTransform, TileStats, check_row_operand, check_tile

_TILE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _tanh_parts(x):
    """(tanh(x), 1 - tanh(x)^2) from e = exp(-2|x|) in [0, 1]: never overflows, and the derivative
    4 e / (1 + e)^2 has no cancellation where tanh saturates. Plain exp: same in every Triton."""
    e = tl.exp(-2.0 * tl.abs(x))
    q = 1.0 / (1.0 + e)
    t = (1.0 - e) * q
    t = tl.where(x < 0.0, -t, t)
    return t, 4.0 * e * q * q


@triton.jit
def _logits(y, in_scale, out_scale, HAS_SOFTCAP: tl.constexpr):
    """z from y (fp32): out_scale * tanh(in_scale * y) with softcap, out_scale * y otherwise (the
    host folds pre_scale, softcap and post_scale into the two factors)."""
    if HAS_SOFTCAP:
        t, _ = _tanh_parts(y * in_scale)
        z = t * out_scale
    else:
        z = y * out_scale
    return z


@triton.jit
def fold_row(
    row_ptr, n, rel, in_scale, out_scale,
    HAS_SOFTCAP: tl.constexpr,
    CENTERED: tl.constexpr, SUM_SQ: tl.constexpr, SUM_LOGITS: tl.constexpr,
    BEFORE: tl.constexpr, AFTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Statistics of z = transform(row[0:n]) in one streaming pass (BLOCK-wide loads, fp32): an
    online max and vectors of max-relative partial sums, rescaled like csrc/common/softmax_moments.h
    whenever the max grows. Returns (max, sum_exp, centered, sum_sq, sum_logits, max before column
    `rel`, max after it); the untracked ones (constexpr flags off: no work) are 0 / -inf. Shared by
    the tile fold and the logits path's forward with extras (triton_token_logps.py)."""
    offsets = tl.arange(0, BLOCK)
    running_max = tl.full([], -float("inf"), tl.float32)
    sums = tl.zeros([BLOCK], dtype=tl.float32)
    centered = tl.zeros([BLOCK], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    sum_logits = tl.zeros([BLOCK], dtype=tl.float32)
    before = tl.full([BLOCK], -float("inf"), tl.float32)
    after = tl.full([BLOCK], -float("inf"), tl.float32)
    for c0 in range(0, n, BLOCK):
        cols = c0 + offsets
        inside = cols < n
        y = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        z = tl.where(inside, _logits(y, in_scale, out_scale, HAS_SOFTCAP), -float("inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        # An all -inf prefix keeps new_max at -inf; shift by 0 then, so no exp(-inf + inf) occurs.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        r = tl.exp(running_max - shift)
        e = tl.exp(z - shift)
        if CENTERED:
            # centered' = r * (centered + d * sums), d = old max - new max (0 while both are -inf,
            # when every sum is still 0); a -inf logit (e == 0) contributes 0, not 0 * -inf.
            d = tl.where(running_max == -float("inf"), 0.0, running_max - shift)
            centered = r * (centered + d * sums) + e * tl.where(e == 0.0, 0.0, z - shift)
        if SUM_SQ:
            sum_sq = sum_sq * (r * r) + e * e
        sums = sums * r + e
        running_max = new_max
        if SUM_LOGITS:
            sum_logits += tl.where(inside, z, 0.0)
        if BEFORE:
            before = tl.maximum(before, tl.where(cols < rel, z, -float("inf")))
        if AFTER:
            after = tl.maximum(after, tl.where(cols > rel, z, -float("inf")))
    return (running_max, tl.sum(sums, axis=0), tl.sum(centered, axis=0), tl.sum(sum_sq, axis=0),
            tl.sum(sum_logits, axis=0), tl.max(before, axis=0), tl.max(after, axis=0))


@triton.jit
def _fold_tile_kernel(
    tile_ptr, ld, chunk, v0,
    targets_ptr,
    max_ptr, sum_exp_ptr, target_logit_ptr,
    centered_ptr, sum_sq_ptr, sum_logits_ptr, before_ptr, after_ptr,
    in_scale, out_scale,
    HAS_SOFTCAP: tl.constexpr,
    CENTERED: tl.constexpr, SUM_SQ: tl.constexpr, SUM_LOGITS: tl.constexpr,
    BEFORE: tl.constexpr, AFTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * ld
    rel = tl.load(targets_ptr + row) - v0  # target's column in this chunk (any int64)
    holds_target = (rel >= 0) & (rel < chunk)
    c_max, c_sum, c_centered, c_sum_sq, c_sum_logits, c_before, c_after = fold_row(
        row_ptr, chunk, rel, in_scale, out_scale, HAS_SOFTCAP, CENTERED, SUM_SQ, SUM_LOGITS, BEFORE, AFTER, BLOCK)

    # Merge the chunk's (max, sum, centered, sum_sq) into the row's running ones. An empty side has
    # max -inf and zero sums: its shift is taken as 0 so that no -inf * 0 or exp(-inf + inf) occurs;
    # the other side's factor is then exactly 1 (softmax_moments.h's merge, without branches).
    o_max = tl.load(max_ptr + row)
    o_sum = tl.load(sum_exp_ptr + row)
    m = tl.maximum(o_max, c_max)
    m_finite = tl.where(m == -float("inf"), 0.0, m)  # (only to keep -inf - -inf out of the dead branch)
    d_o = tl.where(o_max == -float("inf"), 0.0, o_max - m_finite)
    d_c = tl.where(c_max == -float("inf"), 0.0, c_max - m_finite)
    r_o = tl.exp(d_o)
    r_c = tl.exp(d_c)
    tl.store(max_ptr + row, m)
    tl.store(sum_exp_ptr + row, o_sum * r_o + c_sum * r_c)
    if CENTERED:
        o_centered = tl.load(centered_ptr + row)
        tl.store(centered_ptr + row, r_o * (o_centered + d_o * o_sum) + r_c * (c_centered + d_c * c_sum))
    if SUM_SQ:
        o_sum_sq = tl.load(sum_sq_ptr + row)
        tl.store(sum_sq_ptr + row, o_sum_sq * (r_o * r_o) + c_sum_sq * (r_c * r_c))
    if SUM_LOGITS:
        tl.store(sum_logits_ptr + row, tl.load(sum_logits_ptr + row) + c_sum_logits)
    if BEFORE:
        tl.store(before_ptr + row, tl.maximum(tl.load(before_ptr + row), c_before))
    if AFTER:
        tl.store(after_ptr + row, tl.maximum(tl.load(after_ptr + row), c_after))
    # The target's logit, computed exactly as in the loop (so ties with the maxima stay ties).
    y_t = tl.load(row_ptr + rel, mask=holds_target, other=0.0).to(tl.float32)
    z_t = _logits(y_t, in_scale, out_scale, HAS_SOFTCAP)
    tl.store(target_logit_ptr + row, z_t, mask=holds_target)


@triton.jit
def _tile_grad_kernel(
    tile_ptr, ld, chunk, v0,
    targets_ptr, row_stats_ptr, grad_ptr, entropy_grad_ptr, entropy_ptr,
    in_scale, out_scale, grad_scale,
    HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    SPAN: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    span_start = tl.program_id(1) * SPAN
    row_ptr = tile_ptr + row * ld
    g = tl.load(grad_ptr + row)
    active = g != 0.0
    if HAS_ENTROPY:
        ge = tl.load(entropy_grad_ptr + row)
        active = active | (ge != 0.0)
        H = tl.load(entropy_ptr + row, mask=active, other=0.0)
    # Inactive rows read nothing more (y = 0, m = log_sum = 0: finite) and store zeros.
    rel = tl.load(targets_ptr + row, mask=active, other=-1) - v0
    row_max = tl.load(row_stats_ptr + 2 * row, mask=active, other=0.0)
    log_sum = tl.load(row_stats_ptr + 2 * row + 1, mask=active, other=0.0)
    read_end = tl.where(active, chunk, 0)

    offsets = tl.arange(0, BLOCK)
    for c0 in range(0, SPAN, BLOCK):
        cols = span_start + c0 + offsets
        y = tl.load(row_ptr + cols, mask=cols < read_end, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t, dtanh = _tanh_parts(y * in_scale)
            z = t * out_scale
        else:
            z = y * out_scale
        logp = (z - row_max) - log_sum
        p = tl.exp(logp)
        dz = g * (tl.where(cols == rel, 1.0, 0.0) - p)
        if HAS_ENTROPY:
            dz -= ge * (p * tl.where(p == 0.0, 0.0, logp + H))  # p log p is 0 where p is 0
        dy = dz * grad_scale
        if HAS_SOFTCAP:
            dy = dy * dtanh
        dy = tl.where(active, dy, 0.0)
        tl.store(row_ptr + cols, dy.to(tile_ptr.dtype.element_ty), mask=cols < chunk)


def _fold_block(chunk: int, extras: bool) -> int:
    # The interpreter runs blocks as numpy arrays: small blocks keep tests fast and still walk
    # several blocks per chunk. On GPU the extras carry up to six vectors: a smaller block.
    cap = 32 if triton_interpreting() else (2048 if extras else 4096)
    return max(16, min(triton.next_power_of_2(chunk), cap))


def _grad_blocks(chunk: int):
    if triton_interpreting():
        block = max(16, min(triton.next_power_of_2(chunk), 32))
        return block, block * max(1, min(2, triton.cdiv(chunk, block)))
    block = max(16, min(triton.next_power_of_2(chunk), 2048))
    return block, block * max(1, min(4, triton.cdiv(chunk, block)))


def _check_tile_dtype(tile: torch.Tensor) -> None:
    if tile.dtype not in _TILE_DTYPES:
        raise TypeError(f"the Triton tile epilogues take fp32, bf16 or fp16 tiles, got {tile.dtype}"
                        + (" (float64 tiles are a CPU-backend feature: use backend='cpu')"
                           if tile.dtype == torch.float64 else ""))


def _check_rows(name: str, t: Optional[torch.Tensor], shape, device: torch.device) -> None:
    check_row_operand(name, t, shape, torch.float32, device)


def _scales(transform: LogitTransform):
    """(has_softcap, in_scale, out_scale, grad_scale): the transform folded into fp32 factors."""
    pre, cap, post = float(transform.pre_scale), float(transform.softcap), float(transform.post_scale)
    if cap > 0.0:
        return True, pre / cap, cap * post, pre * post
    return False, 1.0, pre * post, pre * post


def _on_device(tile: torch.Tensor):
    return torch.cuda.device(tile.device) if tile.is_cuda else contextlib.nullcontext()


def fold_tile(tile: torch.Tensor, v0: int, targets: torch.Tensor, stats: TileStats,
              transform: LogitTransform) -> None:
    """Merge the tile's rows (vocabulary entries [v0, v0 + chunk)) into `stats` (see TileStats)."""
    check_tile(tile, targets)
    _check_tile_dtype(tile)
    rows, chunk = tile.shape
    if targets.device != tile.device:
        raise ValueError(f"targets must be on {tile.device}, got {targets.device}")
    fields = ("max", "sum_exp", "target_logit", "centered", "sum_sq", "sum_logits", "max_before_target",
              "max_after_target")
    for name in fields:
        _check_rows(f"stats.{name}", getattr(stats, name), (rows,), tile.device)
    if rows == 0 or chunk == 0:
        return
    extras = stats.tracks_extras
    block = _fold_block(chunk, extras)
    has_softcap, in_scale, out_scale, _ = _scales(transform)
    dummy = stats.max  # untracked statistics: a valid pointer the kernel never touches

    def ptr(t):
        return dummy if t is None else t

    with _on_device(tile):
        _fold_tile_kernel[(rows,)](
            tile, tile.stride(0), chunk, v0,
            targets,
            stats.max, stats.sum_exp, stats.target_logit,
            ptr(stats.centered), ptr(stats.sum_sq), ptr(stats.sum_logits), ptr(stats.max_before_target),
            ptr(stats.max_after_target),
            in_scale, out_scale,
            HAS_SOFTCAP=has_softcap,
            CENTERED=stats.centered is not None, SUM_SQ=stats.sum_sq is not None,
            SUM_LOGITS=stats.sum_logits is not None, BEFORE=stats.max_before_target is not None,
            AFTER=stats.max_after_target is not None,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )


def tile_logits_grad_(tile: torch.Tensor, v0: int, targets: torch.Tensor, row_stats: torch.Tensor,
                      grad: torch.Tensor, transform: LogitTransform, entropy_grad: Optional[torch.Tensor] = None,
                      entropy: Optional[torch.Tensor] = None) -> None:
    """Overwrite the tile, in place, with the gradient of the loss w.r.t. y (see tile_epilogue.py)."""
    check_tile(tile, targets)
    _check_tile_dtype(tile)
    if (entropy_grad is None) != (entropy is None):
        raise ValueError("entropy_grad and entropy are given together or not at all")
    rows, chunk = tile.shape
    if targets.device != tile.device:
        raise ValueError(f"targets must be on {tile.device}, got {targets.device}")
    _check_rows("row_stats", row_stats, (rows, 2), tile.device)
    _check_rows("grad", grad, (rows,), tile.device)
    _check_rows("entropy_grad", entropy_grad, (rows,), tile.device)
    _check_rows("entropy", entropy, (rows,), tile.device)
    if rows == 0 or chunk == 0:
        return
    block, span = _grad_blocks(chunk)
    has_softcap, in_scale, out_scale, grad_scale = _scales(transform)
    has_entropy = entropy_grad is not None
    with _on_device(tile):
        _tile_grad_kernel[(rows, triton.cdiv(chunk, span))](
            tile, tile.stride(0), chunk, v0,
            targets, row_stats, grad, entropy_grad if has_entropy else grad, entropy if has_entropy else grad,
            in_scale, out_scale, grad_scale,
            HAS_SOFTCAP=has_softcap, HAS_ENTROPY=has_entropy,
            SPAN=span, BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
