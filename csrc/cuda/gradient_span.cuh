// The logits gradient of one span of one row: out[j] = g * (onehot(j == target) - p_j) with
// p_j = exp((in[j] - m) - log_sum), from the row's statistics m (its max) and log_sum =
// log(sum_j exp(in[j] - m)). in[j] - m is taken first: it is exact for logits near the max, so a
// probability that matters never carries the rounding of a large log-sum-exp (fp32 lse of logits
// near 1e4 is off by ~6e-4). The device building block of the logits backward and of the linear
// path's tile gradient (which substitutes its own per-element formula through gradient_span_with).
// A block of threads covers one span; each element is read once and written once by the same
// thread, so `out` may be `in` (in-place backward). Nothing is materialised.
#pragma once

#include <cstdint>

#include "element_io.cuh"
#include "ptx_math.cuh"

namespace dpo::cuda {

constexpr int kSpanThreads = 256;
constexpr int kSpanLoadsInFlight = 4;    // 16-byte vectors per thread per step
constexpr int kSpanScalarsInFlight = 8;  // elements per thread per step (scalar path)
constexpr int64_t kMaxSpanVectors = 4 * kSpanThreads * kSpanLoadsInFlight;  // 64 KiB of logits
constexpr int64_t kMinSpanVectors = kSpanThreads * kSpanLoadsInFlight;      // 16 KiB of logits

// Spans of a row of n elements (per_vector of them in 16 bytes): the host picks `num_spans` (grid.y) and
// `vectors_per_span` so that spans are about equal, at most 64 KiB (long-lived blocks amortise
// their launch), cut down to 16 KiB when there are too few rows to give every SM ~16 blocks, and
// cover the row whatever its alignment (num_spans * vectors_per_span * per_vector >= n).
struct SpanSplit {
  int64_t num_spans;
  int64_t vectors_per_span;
};

inline SpanSplit split_row(int64_t n, int per_vector, int64_t num_rows, int sm_count) {
  const int64_t vectors = (n + per_vector - 1) / per_vector;
  const int64_t coarsest = (vectors + kMaxSpanVectors - 1) / kMaxSpanVectors;
  const int64_t finest = (vectors + kMinSpanVectors - 1) / kMinSpanVectors;
  const int64_t rows = num_rows > 0 ? num_rows : 1;
  const int64_t fill = (static_cast<int64_t>(sm_count) * 16 + rows - 1) / rows;  // spans for ~16 blocks per SM
  int64_t spans = fill < finest ? fill : finest;
  if (spans < coarsest) spans = coarsest;
  if (spans < 1) spans = 1;
  int64_t per_span = (vectors + spans - 1) / spans;
  per_span = (per_span + kSpanThreads - 1) / kSpanThreads * kSpanThreads;
  return {spans, per_span};
}

// exp(x) and fma without flushing subnormals: the build's --use_fast_math implies -ftz=true for
// ordinary fp32 arithmetic, which would turn a gradient entry below 2^-126 into 0. These keep it,
// as the float64 reference rounded to the logits' dtype has it (bf16 and fp32 have subnormals
// down to 2^-133 and 2^-149). ex2.approx.f32 is what __expf uses, minus the .ftz.
__device__ __forceinline__ float exp_keep_subnormal(float x) {
  return ex2_approx(x * 1.4426950408889634f);  // x * log2(e)
}

__device__ __forceinline__ float fma_keep_subnormal(float a, float b, float c) { return fma_rn(a, b, c); }

__device__ __forceinline__ float mul_keep_subnormal(float a, float b) { return mul_rn(a, b); }

// The logits path's element gradient: g * (onehot - exp((x - m) - log_sum)) with a single
// rounding, fma(-g, p, onehot ? g : 0). m, log_sum: the row's statistics.
struct LogitsGrad {
  float m;
  float log_sum;
  float g;
  __device__ __forceinline__ float operator()(float x, bool is_target) const {
    return fma_keep_subnormal(-g, exp_keep_subnormal((x - m) - log_sum), is_target ? g : 0.f);
  }
};

template <bool kZero, typename Op>
__device__ __forceinline__ float element_grad(const Op& op, float x, bool is_target) {
  if constexpr (kZero) {
    return 0.f;
  } else {
    return op(x, is_target);
  }
}

// Span `span` of `num_spans` of a row of n elements, by a block of kSpanThreads threads:
// out[j] = op(in[j], j == target) (op: a per-element functor like LogitsGrad). target: index of
// the one-hot entry relative to in[0] (any value; outside [0, n) none is hit). kZero: write zeros
// and read nothing (op is not called).
// When in and out share their 16-byte phase (always true in place, and for fresh contiguous
// buffers of aligned rows) the body moves as 16-byte vectors: span 0 also does the unaligned head,
// the last span the tail. Otherwise every element moves as a scalar.
template <typename T, CachePolicy P, bool kZero, typename Op>
__device__ __forceinline__ void gradient_span_with(const T* in, T* out, int64_t n, int64_t span, int64_t num_spans,
                                                   int64_t vectors_per_span, int64_t target, const Op& op) {
  constexpr int K = ElementIo<T>::kPerVector;
  const int tid = threadIdx.x;
  const bool same_phase =
      kZero || ((reinterpret_cast<uintptr_t>(in) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;

  if (same_phase) {
    const int64_t head = head_to_alignment(out, n);
    const int64_t num_vectors = (n - head) / K;
    const int64_t tail_begin = head + num_vectors * K;
    if (span == 0 && tid < head) {
      const float x = kZero ? 0.f : load_element<T, P>(in + tid);
      store_element<T, P>(out + tid, element_grad<kZero>(op, x, tid == target));
    }
    if (span == num_spans - 1 && tid < n - tail_begin) {
      const int64_t j = tail_begin + tid;
      const float x = kZero ? 0.f : load_element<T, P>(in + j);
      store_element<T, P>(out + j, element_grad<kZero>(op, x, j == target));
    }

    const uint4* vin = reinterpret_cast<const uint4*>(in + head);
    uint4* vout = reinterpret_cast<uint4*>(out + head);
    const int64_t begin = span * vectors_per_span;
    const int64_t end = begin + vectors_per_span < num_vectors ? begin + vectors_per_span : num_vectors;
    constexpr int64_t kStep = static_cast<int64_t>(kSpanThreads) * kSpanLoadsInFlight;
    for (int64_t v = begin + tid; v < end; v += kStep) {
      uint4 raw[kSpanLoadsInFlight];
      if constexpr (!kZero) {
#pragma unroll
        for (int u = 0; u < kSpanLoadsInFlight; ++u) {
          const int64_t idx = v + u * kSpanThreads;
          if (idx < end) raw[u] = load_raw<P>(vin + idx);
        }
      }
#pragma unroll
      for (int u = 0; u < kSpanLoadsInFlight; ++u) {
        const int64_t idx = v + u * kSpanThreads;
        if (idx < end) {
          float z[K];
          int hit = -1;
          if constexpr (!kZero) {
            ElementIo<T>::unpack(raw[u], z);
            const int64_t rel = target - (head + idx * K);
            hit = rel >= 0 && rel < K ? static_cast<int>(rel) : -1;
          }
#pragma unroll
          for (int k = 0; k < K; ++k) z[k] = element_grad<kZero>(op, kZero ? 0.f : z[k], k == hit);
          store_raw<P>(vout + idx, ElementIo<T>::pack(z));
        }
      }
    }
  } else {
    const int64_t begin = span * vectors_per_span * K;
    const int64_t end = begin + vectors_per_span * K < n ? begin + vectors_per_span * K : n;
    constexpr int64_t kStep = static_cast<int64_t>(kSpanThreads) * kSpanScalarsInFlight;
    for (int64_t j = begin + tid; j < end; j += kStep) {
      float x[kSpanScalarsInFlight];
#pragma unroll
      for (int u = 0; u < kSpanScalarsInFlight; ++u) {
        if (j + u * kSpanThreads < end) x[u] = load_element<T, P>(in + j + u * kSpanThreads);
      }
#pragma unroll
      for (int u = 0; u < kSpanScalarsInFlight; ++u) {
        const int64_t jj = j + u * kSpanThreads;
        if (jj < end) store_element<T, P>(out + jj, element_grad<false>(op, x[u], jj == target));
      }
    }
  }
}

// The logits path's span: out[j] = g * (onehot(j == target) - exp((in[j] - m) - log_sum)).
template <typename T, CachePolicy P, bool kZero>
__device__ __forceinline__ void gradient_span(const T* in, T* out, int64_t n, int64_t span, int64_t num_spans,
                                              int64_t vectors_per_span, int64_t target, float m, float log_sum,
                                              float g) {
  gradient_span_with<T, P, kZero>(in, out, n, span, num_spans, vectors_per_span, target, LogitsGrad{m, log_sum, g});
}

}  // namespace dpo::cuda
