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

}  // namespace dpo::cpu
