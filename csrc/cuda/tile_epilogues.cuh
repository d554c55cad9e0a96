// Device functions of the linear path's tile epilogues (contracts in kernel_launchers.h):
//  - fold_tile_rows: fold each row of a [rows, chunk] tile of GEMM outputs y, as logits
//    z = transform(y), into that row's running statistics (online max / sum-exp, target logit,
//    and optionally the extras' moments);
//  - tile_row_grad_span: turn one span of one tile row into its gradient w.r.t. y, in place
//    (token log-prob term, optional entropy term, chain rule through the transform).
// The transform (logit_transform.cuh) is a template parameter: with IdentityTransform these are the
// plain-logits epilogues, with no per-element cost for it.
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
#include "logit_transform.cuh"
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
// (combine_row synchronises the block). `shared` holds kMaxRowWarps partials. The target logit is
// transform(y[target]) computed exactly as the stream computes that element.
template <typename T, bool kExtras, typename Transform>
__device__ __forceinline__ void fold_tile_rows(const T* tile, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                                               const int64_t* targets, const TileStats& stats, int warps_per_row,
                                               RowPartial* shared, const Transform& transform) {
  const int row_threads = warps_per_row * kWarpSize;
  const int lane = threadIdx.x % row_threads;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / row_threads) + threadIdx.x / row_threads;
  const bool in_range = r < rows;
  const T* row_ptr = tile + (in_range ? r * ld : 0);
  const int64_t target_rel = in_range ? targets[r] - v0 : -1;
  const bool holds_target = target_rel >= 0 && target_rel < chunk;

  float target_logit = 0.f;
  if (lane == 0 && holds_target) {
    target_logit = transform(load_element<T, CachePolicy::kDefault>(row_ptr + target_rel));
  }

  RowPartial p = stream_row<T, CachePolicy::kDefault, kExtras>(row_ptr, in_range ? chunk : 0, lane, row_threads,
                                                               target_rel, transform);
  p = combine_row<kExtras>(p, warps_per_row, shared);
  if (lane == 0 && in_range) commit_chunk_stats<kExtras>(stats, r, p, holds_target, target_logit);
}

// The element gradient w.r.t. y of the tile epilogue, with z = transform(y):
//   d  = logp = (z - m) - log_sum,  p = exp(d)
//   dz = g * (onehot - p) - ge * p * (d + H)      (= onehot g - p w,  w = g + ge (d + H))
//   dy = dz * dz/dy
// where g and ge arrive already multiplied by the transform's constant factor (scale_grad), so
// dz/dy leaves 1 - tanh^2 for the softcap transform and nothing otherwise. p * (d + H) is 0 where
// p == 0 (d = -inf would give 0 * inf). kEntropy = false drops the entropy term (ge = 0); with the
// identity transform it is the logits path's LogitsGrad. Subnormal results are kept.
template <typename Transform, bool kEntropy>
struct TileGrad {
  Transform transform;
  float m;
  float log_sum;
  float g;        // scale_grad(grad[r])
  float ge;       // scale_grad(entropy_grad[r]) (kEntropy)
  float entropy;  // H = entropy[r] (kEntropy)

  __device__ __forceinline__ float operator()(float y, bool is_target) const {
    float sech2 = 1.f;
    float z;
    if constexpr (Transform::kSoftcap) {
      z = transform.value_and_sech2(y, sech2);
    } else {
      z = transform(y);
    }
    const float d = (z - m) - log_sum;
    const float p = exp_keep_subnormal(d);
    float w = g;
    // p == 0 with a finite d multiplies a finite w by 0; only d = -inf needs the guard (0 * inf).
    // (Tested on d: p == 0 under the build's -ftz would also drop subnormal probabilities.)
    if constexpr (kEntropy) w = fmaf(ge, d > -INFINITY ? d + entropy : 0.f, g);
    float dy = fma_keep_subnormal(-w, p, is_target ? g : 0.f);
    if constexpr (Transform::kSoftcap) dy = mul_keep_subnormal(dy, sech2);
    return dy;
  }
};

// Span `span` of `num_spans` of tile row r, in place: tile[r, j] = TileGrad(tile[r, j], v0 + j ==
// target) with (m, log_sum) = (row_stats[2 r], row_stats[2 r + 1]), g = grad[r], and (kEntropy)
// ge = entropy_grad[r], H = entropy[r]. Zeros, without reading the tile, row_stats or entropy, when
// g == 0 and ge == 0.
template <typename T, bool kEntropy, typename Transform>
__device__ __forceinline__ void tile_row_grad_span(T* tile, int64_t chunk, int64_t ld, int64_t v0, int64_t r,
                                                   int64_t span, int64_t num_spans, int64_t vectors_per_span,
                                                   const int64_t* targets, const float* row_stats, const float* grad,
                                                   const float* entropy_grad, const float* entropy,
                                                   const Transform& transform) {
  T* row = tile + r * ld;
  const float g = grad[r];
  const float ge = kEntropy ? entropy_grad[r] : 0.f;
  if (g == 0.f && ge == 0.f) {
    gradient_span_with<T, CachePolicy::kDefault, true>(row, row, chunk, span, num_spans, vectors_per_span, -1,
                                                       LogitsGrad{0.f, 0.f, 0.f});
  } else {
    const TileGrad<Transform, kEntropy> op{transform,
                                           row_stats[2 * r],
                                           row_stats[2 * r + 1],
                                           transform.scale_grad(g),
                                           transform.scale_grad(ge),
                                           kEntropy ? entropy[r] : 0.f};
    gradient_span_with<T, CachePolicy::kDefault, false>(row, row, chunk, span, num_spans, vectors_per_span,
                                                        targets[r] - v0, op);
  }
}

}  // namespace dpo::cuda
