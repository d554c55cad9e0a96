"""The contract every backend's tile epilogues implement (the linear path's per-chunk kernels).

A *tile* is a 2-D view `[rows, chunk]` with unit stride over its columns and any row stride
`ld >= chunk` (`tile.stride(0)`): the GEMM output `y = hidden_valid @ weight[v0:v0+chunk].T (+ bias)`
for `rows` token rows and vocabulary entries `[v0, v0 + chunk)`, in the compute dtype (fp32, bf16,
fp16; float64 on the CPU backend). The epilogues see the *transformed* logits

    z = post_scale * (softcap * tanh(pre_scale * y / softcap))   when softcap > 0
    z = post_scale * (pre_scale * y)                              otherwise

(`pre_scale` is a model's logit scale, `softcap` Gemma-2's final-logit soft-capping, `post_scale`
is 1 / temperature), computed element by element in the accumulation dtype (fp32; float64 for
float64 tiles) and never stored.

`targets` is int64 `[rows]` (contiguous): the global vocabulary index of each row's target; a value
outside `[v0, v0 + chunk)` (another chunk's target, or a negative ignore_index) never matches.

Each backend module (`cpu_tile_epilogues`, `triton_tile_epilogues`, `cuda_tile_epilogues`) provides

    fold_tile(tile, v0, targets, stats, transform) -> None
    tile_logits_grad_(tile, v0, targets, row_stats, grad, transform, entropy_grad=None, entropy=None) -> None

`fold_tile` merges the tile's rows into the running statistics `stats` (a `TileStats`; see there).
`tile_logits_grad_` overwrites the tile, in place, with the gradient of the loss w.r.t. `y`:

    logp_j = (z_j - m) - log_sum            with (m, log_sum) = (row_stats[r, 0], row_stats[r, 1])
    p_j    = exp(logp_j)
    dz_j   = g * (onehot(v0 + j == target) - p_j) - ge * p_j * (logp_j + H)
    dy_j   = dz_j * post_scale * pre_scale * (1 - tanh(pre_scale * y_j / softcap)^2)   (softcap > 0)
    dy_j   = dz_j * post_scale * pre_scale                                              (otherwise)

with g = grad[r] (the gradient of the row's token log-prob), and ge = entropy_grad[r], H =
entropy[r] (the gradient of the row's entropy and the entropy itself) when given, else ge = 0.
`p_j * logp_j` is 0 where p_j is 0. A row whose g and ge are both 0 becomes zeros without the tile
row or its row_stats being read. row_stats: `[rows, 2]` contiguous; grad, entropy_grad, entropy:
`[rows]` contiguous; all in the accumulation dtype.

Both functions run on the tile's device (the current CUDA stream on GPU) and allocate nothing
tile-sized.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch


# TileStats' fields in the order the logits-path kernels write them ([S, T, 8] `stats`, see
# token_logps_launch.py and csrc/cpu/token_logps.h).
STATS_FIELDS = ("max", "sum_exp", "target_logit", "centered", "sum_sq", "sum_logits", "max_before_target",
                "max_after_target")


class LogitTransform(NamedTuple):
    """The element-wise map from the GEMM output `y` to the logits `z` (see the module docstring)."""

    pre_scale: float = 1.0
    softcap: float = 0.0  # 0: no soft-capping
    post_scale: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.pre_scale == 1.0 and self.softcap == 0.0 and self.post_scale == 1.0

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """z from y with torch ops (for the reference and the tests; kernels fuse it)."""
        z = y * self.pre_scale
        if self.softcap > 0.0:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z * self.post_scale


@dataclasses.dataclass
class TileStats:
    """Running per-row statistics over the vocabulary chunks folded so far, each `[rows]`
    contiguous in the accumulation dtype (fp32; float64 for float64 tiles). `max`, `sum_exp` and
    `target_logit` are always tracked; the others are None when not needed (a backend may then take
    a leaner kernel). Use the same set for every chunk of a pass.

    Initial values (`TileStats.empty`): max = -inf, max_before_target = max_after_target = -inf,
    every other field 0. After the last chunk, with z the row's logits over the whole vocabulary:

        max               = max_j z_j                     (m)
        sum_exp           = sum_j exp(z_j - m)
        target_logit      = z[target]                     (written by the chunk holding the target)
        centered          = sum_j exp(z_j - m) * (z_j - m)
        sum_sq            = sum_j exp(2 (z_j - m))
        sum_logits        = sum_j z_j
        max_before_target = max_{j < target} z_j          (-inf when target == 0)
        max_after_target  = max_{j > target} z_j          (-inf when target == V - 1)

    so that log_sum = log(sum_exp), token logp = (target_logit - m) - log_sum, entropy = log_sum -
    centered / sum_exp, log sum_j p_j^2 = log(sum_sq) - 2 log_sum, mean logit = sum_logits / V, and
    the target is the (first) argmax iff target_logit > max_before_target and target_logit >=
    max_after_target. Merging two chunks' partial results follows csrc/common/softmax_moments.h.
    """

    max: torch.Tensor
    sum_exp: torch.Tensor
    target_logit: torch.Tensor
    centered: Optional[torch.Tensor] = None
    sum_sq: Optional[torch.Tensor] = None
    sum_logits: Optional[torch.Tensor] = None
    max_before_target: Optional[torch.Tensor] = None
    max_after_target: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, rows: int, dtype: torch.dtype, device: torch.device, *, centered: bool = False,
              sum_sq: bool = False, sum_logits: bool = False, top1: bool = False) -> "TileStats":
        def full(value: float) -> torch.Tensor:
            return torch.full((rows,), value, dtype=dtype, device=device)

        ninf = float("-inf")
        return cls(
            max=full(ninf), sum_exp=full(0.0), target_logit=full(0.0),
            centered=full(0.0) if centered else None,
            sum_sq=full(0.0) if sum_sq else None,
            sum_logits=full(0.0) if sum_logits else None,
            max_before_target=full(ninf) if top1 else None,
            max_after_target=full(ninf) if top1 else None,
        )

    @property
    def tracks_extras(self) -> bool:
        return any(t is not None for t in (self.centered, self.sum_sq, self.sum_logits, self.max_before_target,
                                           self.max_after_target))


class FinishedStats(NamedTuple):
    """Per-token results of complete TileStats (every field tracked where the extra is wanted):
    token_logps, row_stats `[..., 2]` = (max, log_sum) for backward, and the extras (None when the
    field behind them was not tracked), all in the statistics' dtype (is_top1 bool)."""

    token_logps: torch.Tensor
    row_stats: torch.Tensor
    entropy: Optional[torch.Tensor]
    mean_logits: Optional[torch.Tensor]
    is_top1: Optional[torch.Tensor]
    log_sum_sq_probs: Optional[torch.Tensor]


def finish_stats(stats: TileStats, vocab_size: int) -> FinishedStats:
    """The per-token quantities from statistics over the whole vocabulary of `vocab_size` entries
    (formulas in TileStats' docstring). Element-wise on the statistics' shape; nothing V-sized."""
    log_sum = stats.sum_exp.log()
    token_logps = (stats.target_logit - stats.max) - log_sum
    row_stats = torch.stack([stats.max, log_sum], dim=-1)
    entropy = mean_logits = is_top1 = log_sum_sq_probs = None
    if stats.centered is not None:
        entropy = log_sum - stats.centered / stats.sum_exp
    if stats.sum_logits is not None:
        mean_logits = stats.sum_logits / vocab_size
    if stats.max_before_target is not None:
        is_top1 = (stats.target_logit > stats.max_before_target) & (stats.target_logit >= stats.max_after_target)
    if stats.sum_sq is not None:
        log_sum_sq_probs = stats.sum_sq.log() - 2 * log_sum
    return FinishedStats(token_logps, row_stats, entropy, mean_logits, is_top1, log_sum_sq_probs)


def check_tile(tile: torch.Tensor, targets: torch.Tensor) -> None:
    """Shape contract shared by the backends (internal callers; a failure is a library bug)."""
    if tile.dim() != 2 or (tile.shape[1] > 1 and tile.stride(1) != 1):
        raise ValueError(f"tile must be 2-D with unit column stride, got shape {tuple(tile.shape)} "
                         f"strides {tile.stride()}")
    if targets.dtype != torch.int64 or targets.shape != (tile.shape[0],) or not targets.is_contiguous():
        raise ValueError(f"targets must be contiguous int64 [{tile.shape[0]}], got {targets.dtype} "
                         f"{tuple(targets.shape)}")


def check_row_operand(name: str, t: Optional[torch.Tensor], shape, dtype: torch.dtype, device: torch.device) -> None:
    """A per-row operand (statistics, row_stats, grad, ...) is what the kernels assume: contiguous,
    of `shape`, in the accumulation `dtype`, on the tile's `device`. None passes (not tracked)."""
    if t is None:
        return
    if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous() or t.device != device:
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})")
