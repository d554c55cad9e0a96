// Loops over one chunk of a vocabulary row, written so that the compiler vectorises them
// (`omp simd`), and compiled once per x86 instruction-set level (target_clones), the best one picked
// when the module loads. fp32 versions use a polynomial exp accurate to about 2 ulp; fp64 versions
// use std::exp (they exist for tight gradient checks, not for speed).
#pragma once

#include <cstdint>

#include "../common/dtypes.h"

namespace dpo::cpu {

// max(x[0:n]); -inf for n == 0. NaN elements may or may not win; callers see them through the sum.
float chunk_max(const float* x, int64_t n);
double chunk_max(const double* x, int64_t n);

// sum(exp(x[i] - shift)).
float chunk_sum_exp(const float* x, int64_t n, float shift);
double chunk_sum_exp(const double* x, int64_t n, double shift);

// out[i] = scale * exp((x[i] - max) - log_sum): softmax probabilities times `scale`, with x - max
// taken first (exact for logits near the max, however large they are). `out` may be `x` itself.
void chunk_scaled_softmax(const float* x, int64_t n, float max, float log_sum, float scale, float* out);
void chunk_scaled_softmax(const double* x, int64_t n, double max, double log_sum, double scale, double* out);

// 16-bit <-> fp32 conversions of a chunk.
void chunk_to_float(const uint16_t* src, DType dtype, int64_t n, float* dst);
void chunk_from_float(const float* src, DType dtype, int64_t n, uint16_t* dst);

// ---- The linear path's tile epilogues (tile_epilogues.cpp; contract in
// dpo_kernels/backends/tile_epilogue.py): z = transform(y), softmax moments and the logits gradient.

enum class TransformKind : int {
  Identity = 0,  // z = y
  Scale = 1,     // z = y * scale
  Softcap = 2,   // z = cap_out * tanh(y * cap_in)
};

// The transform as the fp32 kernels evaluate it: the Python-level constants (pre_scale, softcap,
// post_scale) folded in double and rounded once (scale = pre * post, cap_in = pre / softcap,
// cap_out = softcap * post, grad_scale = pre * post), so that z carries one rounding per product.
// tanh is a vectorisable polynomial / exp form accurate to a few ulp; dz/dy = grad_scale * sech^2
// with sech^2 = 4 e / (1 + e)^2, e = exp(-2 |u|) (accurate where tanh is close to +-1, where
// 1 - tanh^2 would cancel).
struct TransformF {
  TransformKind kind;
  float scale;
  float cap_in;
  float cap_out;
  float grad_scale;
};

// The transform as the float64 kernels evaluate it: the reference's own order of operations,
// z = ((tanh((y * pre) / softcap) * softcap) * post) or (y * pre) * post, with std::tanh; and
// dz/dy = post * pre * (1 - t^2) (the formula autograd uses).
struct TransformD {
  TransformKind kind;
  double pre;
  double softcap;
  double post;
};

// z[i] = transform(y[i]); `z` may be `y`.
void chunk_transform(const float* y, int64_t n, const TransformF& t, float* z);
void chunk_transform(const double* y, int64_t n, const TransformD& t, double* z);

// Sums over one chunk of (transformed) logits relative to `shift` (the chunk's max), d = z - shift:
// sum = sum exp(d), centered = sum exp(d) d (a -inf logit adds 0), sum_sq = sum exp(2 d),
// sum_logits = sum z. One pass.
template <typename Acc>
struct ChunkMoments {
  Acc sum;
  Acc centered;
  Acc sum_sq;
  Acc sum_logits;
};
ChunkMoments<float> chunk_moments(const float* z, int64_t n, float shift);
ChunkMoments<double> chunk_moments(const double* z, int64_t n, double shift);

// The logits gradient of one chunk of a tile row, from the raw GEMM output y:
//   logp = (z - max) - log_sum, p = exp(logp), z = transform(y)
//   dz   = g * (onehot(i == target) - p) - ge * p * (logp + entropy)   (p * (...) = 0 where p = 0)
//   out  = dz * dz/dy
// `target` is relative to y (outside [0, n): no onehot term); ge == 0 skips the entropy term.
// `out` may be `y` (in place).
void chunk_logits_grad(const float* y, int64_t n, const TransformF& t, float max, float log_sum, float g,
                       float ge, float entropy, int64_t target, float* out);
void chunk_logits_grad(const double* y, int64_t n, const TransformD& t, double max, double log_sum, double g,
                       double ge, double entropy, int64_t target, double* out);

}  // namespace dpo::cpu
