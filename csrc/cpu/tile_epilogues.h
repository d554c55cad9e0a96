// C++ CPU tile epilogues of the linear path (contract: dpo_kernels/backends/tile_epilogue.py).
//
// A tile is `rows` rows of `chunk` logits each, row r starting at element r * ld (unit stride over
// the chunk): the GEMM output y for vocabulary entries [v0, v0 + chunk). The epilogues see the
// transformed logits z = transform(y) (pre_scale, softcap, post_scale), evaluated element by element
// in the accumulation type (float for fp32 / bf16 / fp16 tiles, double for float64 tiles) and never
// stored. Rows run in parallel with OpenMP; each row is walked in L1-sized pieces. Results do not
// depend on the number of threads. Nothing tile-sized is allocated.
#pragma once

#include <cstdint>

#include "../common/dtypes.h"

namespace dpo::cpu {

// The element-wise map y -> z (see tile_epilogue.py's LogitTransform); softcap 0: none.
struct LogitTransformParams {
  double pre_scale = 1.0;
  double softcap = 0.0;
  double post_scale = 1.0;
};

// A [rows, chunk] tile with row stride ld (elements) and each row's global target index.
struct TileView {
  void* data;
  DType dtype;
  int64_t rows;
  int64_t chunk;
  int64_t ld;
  int64_t v0;
  const int64_t* targets;  // [rows]; a target outside [v0, v0 + chunk) (negative too) never matches
};

// Running per-row statistics, [rows] contiguous each, in the accumulation type (float, or double for
// float64 tiles). max, sum_exp and target_logit are required; the others are nullptr when not
// tracked (all of them nullptr: a lean kernel that only runs the online log-sum-exp).
struct TileStatsPtrs {
  void* max;
  void* sum_exp;
  void* target_logit;
  void* centered = nullptr;
  void* sum_sq = nullptr;
  void* sum_logits = nullptr;
  void* max_before_target = nullptr;
  void* max_after_target = nullptr;
};

// Merges each row's statistics of z over the tile into `stats`, with the semantics of TileStats:
// (max, sum_exp, centered, sum_sq) merged as SoftmaxMoments (common/softmax_moments.h),
// sum_logits += sum z, target_logit = z[target] when the tile holds the target, max_before_target /
// max_after_target = max over the entries whose global index is below / above the target (the
// whole tile is "before" when target >= v0 + chunk, "after" when target < v0). The tile is only
// read. Throws std::invalid_argument on invalid arguments (negative sizes, ld < chunk with more than
// one row, a missing required pointer, an unknown dtype, a negative softcap).
void tile_fold_stats(const TileView& tile, const TileStatsPtrs& stats, const LogitTransformParams& transform,
                     int num_threads);

// Overwrites the tile, in place, with the gradient of the loss w.r.t. y:
//   logp = (z - m) - log_sum, p = exp(logp),  (m, log_sum) = (row_stats[2 r], row_stats[2 r + 1])
//   dz   = g (onehot(v0 + j == target) - p) - ge p (logp + H)     (p logp = 0 where p = 0)
//   dy   = dz * dz/dy
// with g = grad[r], ge = entropy_grad[r], H = entropy[r] (entropy_grad and entropy both given or
// both nullptr: ge = 0). A row with g == 0 and ge == 0 becomes zeros without its tile row or
// row_stats being read. row_stats [rows, 2], grad, entropy_grad, entropy [rows]: contiguous, in the
// accumulation type. Throws std::invalid_argument as tile_fold_stats does.
void tile_logits_grad(const TileView& tile, const void* row_stats, const void* grad, const void* entropy_grad,
                      const void* entropy, const LogitTransformParams& transform, int num_threads);

}  // namespace dpo::cpu
