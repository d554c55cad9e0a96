// Host launch functions of the CUDA kernels, callable from host-compiled code (no CUDA headers
// here: streams travel as void*, the cudaStream_t handle PyTorch reports). Every function enqueues
// its kernel(s) on `stream` and returns without synchronising; it checks the launch and throws
// std::runtime_error naming the kernel, the dtype and the shapes when it fails, and
// std::invalid_argument for arguments no kernel can take (float64, a misaligned base pointer, a
// grid beyond CUDA's limits). Nothing is allocated: every buffer is the caller's.
#pragma once

#include <cstdint>

#include "common/dtypes.h"
#include "common/token_rows.h"

namespace dpo::cuda {

// ---- Logits path ----------------------------------------------------------------------------

// For every row (s, t) of `rows` (fp32/bf16/fp16 logits, see common/token_rows.h), with x =
// logits[s, t, :]:
//   row_stats[2 row]     = m       = max_j x_j
//   row_stats[2 row + 1] = log_sum = log(sum_j exp(x_j - m))
//   token_logps[row]     = (x[target] - m) - log_sum
// (the row's log-sum-exp is m + log_sum; it is kept as the pair because an fp32 lse of logits near
// 1e4 is off by ~6e-4, while m is exact and log_sum small). Masked rows (target == ignore_index)
// are not read and get 0, 0 and 0; a row whose logits are all -inf gets m = log_sum = -inf and
// token_logps = NaN (as log_softmax); a target outside [0, V) that is not ignore_index gives
// token_logps = NaN (Python rejects such labels before launching). token_logps: contiguous fp32
// [S * T]; row_stats: contiguous fp32 [S * T, 2] (interleaved pairs). Reads each unmasked row
// once; writes 12 bytes a row.
// With `stats` (not nullptr) the same single pass also folds the extras' statistics and writes only
// `stats`, contiguous fp32 [S * T, 8]: the linear path's TileStats fields over the whole row, in
// the order max, sum_exp, target_logit, centered, sum_sq, sum_logits, max_before_target,
// max_after_target (dpo_kernels/backends/tile_epilogue.py); token_logps and row_stats are then not
// touched. Masked rows get the empty set's values (-inf, 0, 0, 0, 0, 0, -inf, -inf) unread; a
// target outside [0, V) gets target_logit NaN.
void token_logps_forward(const TokenRows& rows, float* token_logps, float* row_stats, float* stats, void* stream);

// out[s, t, v] = grad[row] * (onehot(v == target) - exp((logits[s, t, v] - m) - log_sum)) in the
// logits' dtype, (m, log_sum) = (row_stats[2 row], row_stats[2 row + 1]) as the forward wrote them,
// with zero rows where the token is masked or grad[row] == 0 (those rows, and their row_stats, are
// not read). `out` has its own row strides (unit stride over V) and may be the logits themselves:
// each element is read, then written, by the same thread. row_stats: contiguous fp32 [S * T, 2];
// grad: contiguous fp32 [S * T].
// With entropy_grad and entropy (contiguous fp32 [S * T], both given or both nullptr) the entropy's
// gradient joins, as in the tile gradient (TileGrad): out -= ge * p * (log p + H), ge =
// entropy_grad[row], H = entropy[row]; a row is then zeros unread when grad and entropy_grad are 0.
void token_logps_backward(const TokenRows& rows, const float* row_stats, const float* grad, const float* entropy_grad,
                          const float* entropy, void* out, int64_t out_stride_s, int64_t out_stride_t, void* stream);

// ---- Tile epilogues of the linear path ------------------------------------------------------
// (contract: dpo_kernels/backends/tile_epilogue.py.) A tile is `rows` x `chunk` GEMM outputs y
// (fp32/bf16/fp16) for vocabulary entries [v0, v0 + chunk) of `rows` token rows; row r starts at
// tile + r * ld elements (unit stride over the chunk). The epilogues see the logits
// z = transform(y) (LogitTransform below), computed element by element in fp32 and never stored.
// Per-row arrays (statistics, targets, row_stats, grad, entropy_grad, entropy) are indexed by tile
// row r: pass pointers offset to the tile's first row when the tile covers a block of tokens
// (row_stats by 2 floats a row). targets[r] is the global vocabulary index of row r's target; a
// value outside [v0, v0 + chunk) (another chunk, or a masked row's ignore_index) never matches.
// Both launchers throw std::invalid_argument, naming the argument, for negative sizes, ld < chunk
// with more than one row, v0 < 0, a missing required pointer, float64, a softcap that is negative
// or not finite, non-finite scales, or factors that overflow fp32.

// The element-wise map y -> z:
//   z = post_scale * (softcap * tanh(pre_scale * y / softcap))   when softcap > 0
//   z = post_scale * (pre_scale * y)                              when softcap == 0
// pre_scale: a model's logit scale; softcap: Gemma-2's final-logit soft-capping; post_scale:
// 1 / temperature. The kernels fold the parameters into fp32 factors (pre_scale / softcap,
// softcap * post_scale, pre_scale * post_scale) and take a kernel variant without any per-element
// transform when the map is the identity (softcap == 0 and pre_scale * post_scale == 1 exactly).
// tanh is accurate to a few fp32 ulps (not tanh.approx).
struct LogitTransform {
  double pre_scale = 1.0;
  double softcap = 0.0;  // 0: no soft-capping
  double post_scale = 1.0;
};

// Running per-row statistics, fp32 [rows] each. Required: max, sum_exp, target_logit; the others
// are nullptr when not tracked (tracking any of them selects the slower extras kernel). Before the
// first chunk initialise max = -inf, sum_exp = 0, centered = 0, sum_sq = 0, sum_logits = 0,
// max_before_target = -inf, max_after_target = -inf; target_logit is written by the chunk that
// holds the target. Use the same set of tracked statistics (and the same transform) for every
// chunk of a pass. After the last chunk, with z the row's logits over the whole vocabulary (see
// common/softmax_moments.h):
//   row_stats pair   = (max, log(sum_exp))   (what tile_logits_grad takes; lse = max + log(sum_exp))
//   token_logp       = (target_logit - max) - log(sum_exp)
//   entropy          = log(sum_exp) - centered / sum_exp
//   log_sum_sq_probs = log(sum_sq) - 2 log(sum_exp)
//   mean_logits      = sum_logits / V
//   is_top1          = target_logit > max_before_target && target_logit >= max_after_target
//                      (argmax == target, ties resolved to the first index like torch.argmax)
struct TileStats {
  float* max;                // running max over the folded chunks of z
  float* sum_exp;            // sum exp(z - max)
  float* target_logit;       // z[target]
  float* centered;           // sum exp(z - max) * (z - max)   (entropy)
  float* sum_sq;             // sum exp(2 (z - max))           (log_sum_sq_probs)
  float* sum_logits;         // sum z                          (mean_logits)
  float* max_before_target;  // max z[j], j < target           (is_top1)
  float* max_after_target;   // max z[j], j > target           (is_top1)

  bool tracks_extras() const {
    return centered || sum_sq || sum_logits || max_before_target || max_after_target;
  }
};

// Folds one tile into the running statistics: each row is read once (16-byte loads), each element
// transformed to z in fp32, the row's chunk statistics reduced across the threads of the row and
// merged into stats[r] by one thread (no atomics; deterministic). target_logit is the same fp32
// value as the target's element in the statistics. Materialises nothing.
void tile_fold_stats(const void* tile, DType dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                     const int64_t* targets, const TileStats& stats, const LogitTransform& transform, void* stream);

// Overwrites the tile, in place, with the gradient of the loss w.r.t. y:
//   logp_j = (z_j - m) - log_sum,  p_j = exp(logp_j)        (z_j = transform(tile[r, j]))
//   dz_j   = g * (onehot(v0 + j == targets[r]) - p_j) - ge * p_j * (logp_j + H)
//   dy_j   = dz_j * pre_scale * post_scale * (1 - tanh(pre_scale * y_j / softcap)^2)   (softcap > 0)
//   dy_j   = dz_j * pre_scale * post_scale                                              (otherwise)
// with (m, log_sum) = (row_stats[2 r], row_stats[2 r + 1]) the row's max and log(sum_exp) of z over
// the whole vocabulary, g = grad[r], and ge = entropy_grad[r], H = entropy[r] (the gradient of the
// row's entropy and the entropy) when entropy_grad is given (entropy_grad and entropy: both or
// neither; nullptr: ge = 0, a kernel without the entropy term). p_j * (logp_j + H) is 0 where
// p_j == 0. A row with g == 0 and ge == 0 becomes zeros without the tile row, its row_stats or
// entropy being read. row_stats: fp32 [rows, 2] (interleaved pairs); grad, entropy_grad, entropy:
// fp32 [rows]. One read and one write per element; the tile keeps its dtype (one rounding);
// subnormal results are kept.
void tile_logits_grad(void* tile, DType dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                      const int64_t* targets, const float* row_stats, const float* grad, const float* entropy_grad,
                      const float* entropy, const LogitTransform& transform, void* stream);

}  // namespace dpo::cuda
