#include "vec_math.h"

#include <cmath>

// DPO_NO_CPU_CLONES builds one version for the compiler's target flags (used to test the AVX2 and
// baseline code paths on a machine whose CPU would pick another clone).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && !defined(DPO_NO_CPU_CLONES)
#define DPO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DPO_CPU_CLONES
#endif

namespace dpo::cpu {
namespace {

// exp(x) for x <= 0, the only arguments the callers pass ((x - max) and (x - max) - log_sum).
// Range reduction x = n ln2 + r with |r| <= ln2 / 2, a degree-6 Taylor polynomial for exp(r)
// (error < 2e-7 relative before rounding), and 2^n assembled in the exponent bits. Results below
// 2^-125 flush to 0, far below anything that changes a sum that contains exp(0) = 1. NaN
// propagates. Branch-free ternaries only: the compiler must if-convert them to vectorise the loops
// for every instruction-set clone (an extra clamp here once left the AVX2 clone scalar).
inline float exp_poly(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;       // few mantissa bits: n * kLn2Hi is exact
  const float kLn2Lo = -2.12194440e-4f;    // ln2 - kLn2Hi
  const float kRound = 12582912.0f;        // 1.5 * 2^23: adding it rounds to an integer
  const uint32_t kRoundBits = 0x4B400000u;
  float xc = x < -87.0f ? -87.0f : x;
  float t = xc * kLog2e + kRound;
  float nf = t - kRound;
  uint32_t n = float_to_bits(t) - kRoundBits;  // two's complement integer n
  float r = xc - nf * kLn2Hi;
  r = r - nf * kLn2Lo;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  float scale = bits_to_float((n + 127u) << 23);
  // Flush by masking the bits (a select here stays a branch in the SSE2 clone). NaN x keeps y.
  const uint32_t keep = 0u - static_cast<uint32_t>(!(x < -87.0f));
  return bits_to_float(float_to_bits(p * scale) & keep);
}

}  // namespace

DPO_CPU_CLONES float chunk_max(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

double chunk_max(const double* x, int64_t n) {
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

DPO_CPU_CLONES float chunk_sum_exp(const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_poly(x[i] - shift);
  return s;
}

double chunk_sum_exp(const double* x, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

DPO_CPU_CLONES void chunk_scaled_softmax(const float* x, int64_t n, float max, float log_sum, float scale,
                                         float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = scale * exp_poly((x[i] - max) - log_sum);
}

void chunk_scaled_softmax(const double* x, int64_t n, double max, double log_sum, double scale, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = scale * std::exp((x[i] - max) - log_sum);
}

DPO_CPU_CLONES void chunk_to_float(const uint16_t* src, DType dtype, int64_t n, float* dst) {
  if (dtype == DType::BFloat16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(src[i]);
  }
}

DPO_CPU_CLONES void chunk_from_float(const float* src, DType dtype, int64_t n, uint16_t* dst) {
  if (dtype == DType::BFloat16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_fp16(src[i]);
  }
}

}  // namespace dpo::cpu
