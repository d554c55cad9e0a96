// Device functions of the linear path's tile epilogues (contracts in kernel_launchers.h):
//  - fold_tile_rows: fold each row of a [rows, chunk] logits tile into that row's running
//    statistics (online max / sum-exp, target logit, and optionally the extras' moments);
//  - tile_row_grad_span: turn one span of one tile row into its logits gradient, in place.
// tile_epilogues.cu wraps them in kernels; a fused GEMM kernel can call them on a tile it has
// written to global memory. Tiles use default caching (a GEMM produced them and reads the gradient
// next). Nothing is materialised: statistics live in the caller's [rows] fp32 arrays (and the
// gradient's (m, log_sum) pairs in its [rows, 2] row_stats).
#pragma once

#include <cstdint>

#include "common/online_lse.h"
#include "common/softmax_moments.h"
#include "gradient_span.cuh"
#include "kernel_launchers.h"
#include "row_stream.cuh"

namespace dpo::cuda {

// Merges one chunk's statistics of row r (held by the calling thread) into the running statistics;
// one thread per row, so no atomics. holds_target: the chunk contains the row's target.
template <bool kExtras>
__device__ __forceinline__ void commit_chunk_stats(const TileStats& stats, int64_t r, const RowPartial& chunk,
                                                   bool holds_target, float target_logit) {
  if constexpr (kExtras) {
    SoftmaxMoments<float> run{stats.max[r], stats.sum_exp[r], stats.centered ? stats.centered[r] : 0.f,
                              stats.sum_sq ? stats.sum_sq[r] : 0.f};
    run.merge(chunk.m);
    stats.max[r] = run.max;
    stats.sum_exp[r] = run.sum;
    if (stats.centered) stats.centered[r] = run.centered;
    if (stats.sum_sq) stats.sum_sq[r] = run.sum_sq;
    if (stats.sum_logits) stats.sum_logits[r] += chunk.sum_logits;
    if (stats.max_before_target) {
      stats.max_before_target[r] = fmaxf(stats.max_before_target[r], chunk.max_before);
    }
    if (stats.max_after_target) stats.max_after_target[r] = fmaxf(stats.max_after_target[r], chunk.max_after);
  } else {
    OnlineLse<float> run{stats.max[r], stats.sum_exp[r]};
    run.merge(chunk.m.max, chunk.m.sum);
    stats.max[r] = run.max;
    stats.sum_exp[r] = run.sum;
  }
  if (holds_target) stats.target_logit[r] = target_logit;
}

// Rows of the tile covered by this block: blockDim.x / (warps_per_row * 32) rows per block, row
// blockIdx.x * rows_per_block + threadIdx.x / row_threads. Every thread of the block must call it
// (combine_row synchronises the block). `shared` holds kMaxRowWarps partials.
template <typename T, bool kExtras>
__device__ __forceinline__ void fold_tile_rows(const T* tile, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                                               const int64_t* targets, const TileStats& stats, int warps_per_row,
                                               RowPartial* shared) {
  const int row_threads = warps_per_row * kWarpSize;
  const int lane = threadIdx.x % row_threads;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / row_threads) + threadIdx.x / row_threads;
  const bool in_range = r < rows;
  const T* row_ptr = tile + (in_range ? r * ld : 0);
  const int64_t target_rel = in_range ? targets[r] - v0 : -1;
  const bool holds_target = target_rel >= 0 && target_rel < chunk;

  float target_logit = 0.f;
  if (lane == 0 && holds_target) target_logit = load_element<T, CachePolicy::kDefault>(row_ptr + target_rel);

  RowPartial p = stream_row<T, CachePolicy::kDefault, kExtras>(row_ptr, in_range ? chunk : 0, lane, row_threads,
                                                               target_rel);
  p = combine_row<kExtras>(p, warps_per_row, shared);
  if (lane == 0 && in_range) commit_chunk_stats<kExtras>(stats, r, p, holds_target, target_logit);
}

// Span `span` of `num_spans` of tile row r, in place: tile[r, j] = g * (onehot(v0 + j == target) -
// exp((tile[r, j] - m) - log_sum)) with (m, log_sum) = (row_stats[2 r], row_stats[2 r + 1]);
// zeros, without reading the tile or row_stats, when g == 0.
template <typename T>
__device__ __forceinline__ void tile_row_grad_span(T* tile, int64_t chunk, int64_t ld, int64_t v0, int64_t r,
                                                   int64_t span, int64_t num_spans, int64_t vectors_per_span,
                                                   const int64_t* targets, const float* row_stats, const float* grad) {
  T* row = tile + r * ld;
  const float g = grad[r];
  if (g == 0.f) {
    gradient_span<T, CachePolicy::kDefault, true>(row, row, chunk, span, num_spans, vectors_per_span, -1, 0.f, 0.f,
                                                  0.f);
  } else {
    gradient_span<T, CachePolicy::kDefault, false>(row, row, chunk, span, num_spans, vectors_per_span,
                                                   targets[r] - v0, row_stats[2 * r], row_stats[2 * r + 1], g);
  }
}

}  // namespace dpo::cuda
