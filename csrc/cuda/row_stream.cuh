// Streaming one row of logits into softmax statistics: the device building block of the logits
// forward and of the linear path's tile fold. The threads of a row (one to sixteen warps) each
// walk a strided share of the row with 16-byte loads, keep online statistics in fp32 registers,
// and are combined with warp shuffles, then (for rows spanning several warps) through shared
// memory and a second shuffle round, merging partials with OnlineLse / SoftmaxMoments semantics:
// exp(-inf - -inf) is never evaluated, a NaN logit propagates. Nothing is materialised. The values
// streamed are transform(element) (logit_transform.cuh); the logits path uses the identity, for
// which the transform compiles to nothing.
#pragma once

#include <cstdint>

#include "common/online_lse.h"
#include "common/softmax_moments.h"
#include "element_io.cuh"
#include "logit_transform.cuh"

namespace dpo::cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxRowThreads = 512;                     // block size cap of the row kernels
constexpr int kMaxRowWarps = kMaxRowThreads / kWarpSize;
constexpr int kLoadsInFlight = 4;                       // 16-byte loads a thread issues before using them

// One thread's (or a group's) statistics of a set of logits. `m.max/m.sum` always; the rest only
// when extras are tracked.
struct RowPartial {
  SoftmaxMoments<float> m;
  float sum_logits;  // sum z
  float max_before;  // max z[j], j < target
  float max_after;   // max z[j], j > target

  __device__ __forceinline__ static RowPartial empty() {
    return {SoftmaxMoments<float>::empty(), 0.f, -INFINITY, -INFINITY};
  }
};

template <bool kExtras>
__device__ __forceinline__ void merge_partial(RowPartial& a, const RowPartial& b) {
  if constexpr (kExtras) {
    a.m.merge(b.m);
    a.sum_logits += b.sum_logits;
    a.max_before = fmaxf(a.max_before, b.max_before);
    a.max_after = fmaxf(a.max_after, b.max_after);
  } else {
    OnlineLse<float> lse{a.m.max, a.m.sum};
    lse.merge(b.m.max, b.m.sum);
    a.m.max = lse.max;
    a.m.sum = lse.sum;
  }
}

template <bool kExtras>
__device__ __forceinline__ RowPartial shuffle_xor(const RowPartial& p, int mask) {
  RowPartial o = RowPartial::empty();
  o.m.max = __shfl_xor_sync(0xffffffffu, p.m.max, mask);
  o.m.sum = __shfl_xor_sync(0xffffffffu, p.m.sum, mask);
  if constexpr (kExtras) {
    o.m.centered = __shfl_xor_sync(0xffffffffu, p.m.centered, mask);
    o.m.sum_sq = __shfl_xor_sync(0xffffffffu, p.m.sum_sq, mask);
    o.sum_logits = __shfl_xor_sync(0xffffffffu, p.sum_logits, mask);
    o.max_before = __shfl_xor_sync(0xffffffffu, p.max_before, mask);
    o.max_after = __shfl_xor_sync(0xffffffffu, p.max_after, mask);
  }
  return o;
}

// Butterfly over the 32 lanes of a warp; every lane ends with the warp's statistics. All lanes of
// the warp must call it.
template <bool kExtras>
__device__ __forceinline__ RowPartial warp_combine(RowPartial p) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) merge_partial<kExtras>(p, shuffle_xor<kExtras>(p, mask));
  return p;
}

// Statistics of a whole row whose threads are `warps_per_row` consecutive warps of the block.
// The result is valid in the row's first warp. Every thread of the block must call it (it holds a
// __syncthreads when warps_per_row > 1; warps_per_row is uniform over the launch).
template <bool kExtras>
__device__ __forceinline__ RowPartial combine_row(RowPartial p, int warps_per_row, RowPartial* shared) {
  p = warp_combine<kExtras>(p);
  if (warps_per_row == 1) return p;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) shared[warp] = p;
  __syncthreads();
  if (warp % warps_per_row == 0) {
    p = lane < warps_per_row ? shared[warp + lane] : RowPartial::empty();
    p = warp_combine<kExtras>(p);
  }
  return p;
}

// Clamps the target's position relative to the first of K slots into [-1, K]: slot k lies before
// the target when k < rel, after it when k > rel.
template <int K>
__device__ __forceinline__ int slot_of_target(int64_t rel) {
  return rel < 0 ? -1 : (rel > K ? K : static_cast<int>(rel));
}

// Folds U groups of K values into p. valid[u] says group u holds real logits (padding is -inf and
// adds nothing except to sum_logits, which skips it); rel[u] places the target (extras only).
template <bool kExtras, int U, int K>
__device__ __forceinline__ void fold_values(RowPartial& p, const float (&z)[U][K], const bool (&valid)[U],
                                            const int (&rel)[U]) {
  float batch_max = -INFINITY;
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int k = 0; k < K; ++k) batch_max = fmaxf(batch_max, z[u][k]);

  if (batch_max > p.m.max) {  // false for an all -inf (or all NaN) batch
    if (p.m.sum != 0.f) {
      if constexpr (kExtras) {
        p.m.rescale_to(batch_max);
      } else {
        p.m.sum *= __expf(p.m.max - batch_max);
        p.m.max = batch_max;
      }
    } else {
      p.m.max = batch_max;  // empty so far: nothing to rescale
    }
  }
  // While the set is empty the max is -inf and every value is -inf: shift by 0, so exp(-inf) = 0.
  const float shift = p.m.max == -INFINITY ? 0.f : p.m.max;

  float sums[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float s = 0.f, a = 0.f, q = 0.f, zs = 0.f;
    float before = -INFINITY, after = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float d = z[u][k] - shift;
      const float e = __expf(d);
      s += e;
      if constexpr (kExtras) {
        a += e > 0.f ? e * d : 0.f;  // a -inf logit (e == 0) adds 0, not 0 * -inf
        q += e * e;
        zs += z[u][k];
        before = fmaxf(before, k < rel[u] ? z[u][k] : -INFINITY);
        after = fmaxf(after, k > rel[u] ? z[u][k] : -INFINITY);
      }
    }
    sums[u] = s;
    if constexpr (kExtras) {
      p.m.centered += a;
      p.m.sum_sq += q;
      p.sum_logits += valid[u] ? zs : 0.f;
      p.max_before = fmaxf(p.max_before, before);
      p.max_after = fmaxf(p.max_after, after);
    }
  }
#pragma unroll
  for (int width = 1; width < U; width *= 2)
#pragma unroll
    for (int u = 0; u + width < U; u += 2 * width) sums[u] += sums[u + width];
  p.m.sum += sums[0];
}

// Statistics of this thread's share of row[0, n): thread `lane` of `threads` takes 16-byte vectors
// lane, lane + threads, ... of the row's aligned body (kLoadsInFlight of them per step, issued
// before any is used) plus at most one element of the unaligned head and one of the tail.
// target_rel: the target's index relative to row[0] (extras only; any value, need not be in range).
// Each element enters the statistics as transform(element) in fp32; padding stays -inf.
template <typename T, CachePolicy P, bool kExtras, typename Transform = IdentityTransform>
__device__ __forceinline__ RowPartial stream_row(const T* row, int64_t n, int lane, int threads, int64_t target_rel,
                                                 const Transform& transform = {}) {
  constexpr int K = ElementIo<T>::kPerVector;
  RowPartial p = RowPartial::empty();
  const int64_t head = head_to_alignment(row, n);
  const int64_t num_vectors = (n - head) / K;
  const int64_t tail_begin = head + num_vectors * K;

  {  // head [0, head) and tail [tail_begin, n): fewer than K elements each
    float z[2][1];
    bool valid[2];
    int rel[2];
    valid[0] = lane < head;
    valid[1] = lane < n - tail_begin;
    z[0][0] = valid[0] ? transform(load_element<T, P>(row + lane)) : -INFINITY;
    z[1][0] = valid[1] ? transform(load_element<T, P>(row + tail_begin + lane)) : -INFINITY;
    rel[0] = slot_of_target<1>(target_rel - lane);
    rel[1] = slot_of_target<1>(target_rel - (tail_begin + lane));
    fold_values<kExtras>(p, z, valid, rel);
  }

  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  const int64_t step = static_cast<int64_t>(threads) * kLoadsInFlight;
  for (int64_t v = lane; v < num_vectors; v += step) {
    uint4 raw[kLoadsInFlight];
    bool valid[kLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int64_t idx = v + static_cast<int64_t>(u) * threads;
      valid[u] = idx < num_vectors;
      raw[u] = valid[u] ? load_raw<P>(body + idx) : neg_inf_vector<T>();
    }
    // Fold vector by vector: only one vector's K fp32 values are live besides the raw loads.
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      float z[1][K];
      ElementIo<T>::unpack(raw[u], z[0]);
      if constexpr (!Transform::kIdentity) {
#pragma unroll
        for (int k = 0; k < K; ++k) z[0][k] = valid[u] ? transform(z[0][k]) : -INFINITY;
      }
      const int64_t first = head + (v + static_cast<int64_t>(u) * threads) * K;
      const bool vector_valid[1] = {valid[u]};
      const int rel[1] = {kExtras ? slot_of_target<K>(target_rel - first) : 0};
      fold_values<kExtras>(p, z, vector_valid, rel);
    }
  }
  return p;
}

// How a row kernel maps rows to threads: warps_per_row warps per row, `threads` per block
// (a multiple of the row's threads), `blocks` blocks.
struct RowLaunch {
  int warps_per_row;
  int threads;
  int64_t blocks;
};

// A warp per row for short rows, a 256-thread block per row from 16k elements on; rows of at
// least 64 elements per thread get up to 16 warps when there are too few rows to give every SM
// about 32 resident warps.
inline RowLaunch choose_row_launch(int64_t num_rows, int64_t n, int sm_count) {
  int warps = 1;
  while (warps < 8 && static_cast<int64_t>(warps) * 2 * 2048 <= n) warps *= 2;
  const int64_t target_warps = static_cast<int64_t>(sm_count) * 32;
  while (warps < kMaxRowWarps && num_rows * warps < target_warps &&
         static_cast<int64_t>(warps) * 2 * kWarpSize * 64 <= n) {
    warps *= 2;
  }
  const int row_threads = warps * kWarpSize;
  const int threads = row_threads > 256 ? row_threads : 256;
  const int rows_per_block = threads / row_threads;
  return {warps, threads, (num_rows + rows_per_block - 1) / rows_per_block};
}

}  // namespace dpo::cuda
