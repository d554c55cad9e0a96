#include "vec_math.h"

#include <cmath>

// DPO_NO_CPU_CLONES builds one version for the compiler's target flags (used to test the AVX2 and
// baseline code paths on a machine whose CPU would pick another clone).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && !defined(DPO_NO_CPU_CLONES)
#define DPO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DPO_CPU_CLONES
#endif

// The helpers below must be inlined into each clone: an out-of-line copy is compiled for the
// baseline ISA only and every clone would call it (GCC 12 out-lined the softcap gradient loops that
// way, 25x slower than inlined).
#if defined(__GNUC__)
#define DPO_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DPO_ALWAYS_INLINE inline
#endif

namespace dpo::cpu {
namespace {

// cond ? a : b with bit operations. GCC 12 leaves a float select (`x < c ? c : x`) whose result
// feeds more arithmetic as a branch in the AVX2 and SSE2 clones ("control flow in loop": the loop is
// not vectorised); the bit form if-converts in every clone.
DPO_ALWAYS_INLINE float select_bits(bool cond, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(cond);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

// exp(x) for x <= 0, the only arguments the callers pass ((x - max) and (x - max) - log_sum).
// Range reduction x = n ln2 + r with |r| <= ln2 / 2, a degree-6 Taylor polynomial for exp(r)
// (error < 2e-7 relative before rounding), and 2^n assembled in the exponent bits. Results below
// 2^-125 flush to 0, far below anything that changes a sum that contains exp(0) = 1. NaN
// propagates. Branch-free selects only (bit operations, select_bits): the compiler must if-convert
// them to vectorise the loops for every instruction-set clone (the clamp below written as a float
// ternary left the AVX2 and SSE2 clones of chunk_sum_exp / chunk_scaled_softmax scalar with GCC 12).
DPO_ALWAYS_INLINE float exp_poly(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;       // few mantissa bits: n * kLn2Hi is exact
  const float kLn2Lo = -2.12194440e-4f;    // ln2 - kLn2Hi
  const float kRound = 12582912.0f;        // 1.5 * 2^23: adding it rounds to an integer
  const uint32_t kRoundBits = 0x4B400000u;
  float xc = select_bits(x < -87.0f, -87.0f, x);  // the same values as a float select; see select_bits
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

// tanh(u), given e = exp(-2 |u|): Cephes' odd polynomial (tanhf.c, about 1 ulp on |u| < 0.625)
// near 0, else (1 - e) / (1 + e) (a few ulp: e <= exp(-1.25) there, so no cancellation). e flushes
// to 0 past |u| = 43.5, giving exactly +-1. The sign is restored with bit operations; NaN propagates
// (through e). Both branches are evaluated and selected, so loops over it vectorise.
DPO_ALWAYS_INLINE float tanh_with_exp(float u, float e) {
  const float a = std::fabs(u);
  const float s = u * u;
  float poly = -5.70498872745e-3f;
  poly = poly * s + 2.06390887954e-2f;
  poly = poly * s - 5.37397155531e-2f;
  poly = poly * s + 1.33314422036e-1f;
  poly = poly * s - 3.33332819422e-1f;
  const float small = poly * s * a + a;
  const float big = (1.0f - e) / (1.0f + e);
  const float t = select_bits(a < 0.625f, small, big);
  return bits_to_float(float_to_bits(t) | (float_to_bits(u) & 0x80000000u));
}

// One element of the fp32 transform: z, and (kWithSlope) dz/dy.
template <TransformKind K, bool kWithSlope>
DPO_ALWAYS_INLINE float transform_element(float y, const TransformF& t, float* slope) {
  if constexpr (K == TransformKind::Identity) {
    if constexpr (kWithSlope) *slope = 1.0f;
    return y;
  } else if constexpr (K == TransformKind::Scale) {
    if constexpr (kWithSlope) *slope = t.grad_scale;
    return y * t.scale;
  } else {
    const float u = y * t.cap_in;
    const float e = exp_poly(-2.0f * std::fabs(u));
    if constexpr (kWithSlope) {
      const float q = 1.0f + e;
      *slope = t.grad_scale * ((4.0f * e) / (q * q));  // sech^2(u) = 4 e / (1 + e)^2
    }
    return t.cap_out * tanh_with_exp(u, e);
  }
}

template <TransformKind K>
DPO_ALWAYS_INLINE void transform_loop(const float* y, int64_t n, const TransformF& t, float* z) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] = transform_element<K, false>(y[i], t, nullptr);
}

// One element of the fp32 logits gradient (see chunk_logits_grad); onehot_g: g at the target, else 0.
template <TransformKind K, bool kEntropy>
DPO_ALWAYS_INLINE float grad_element(float y, const TransformF& t, float max, float log_sum, float g, float ge, float entropy,
                          float onehot_g) {
  float slope;
  const float z = transform_element<K, true>(y, t, &slope);
  const float logp = (z - max) - log_sum;
  const float p = exp_poly(logp);
  float dz;
  if constexpr (kEntropy) {
    dz = p * -(g + ge * (logp + entropy));
    dz = select_bits(p != 0.0f, dz, 0.0f);  // p log p = 0 at p = 0 (logp may be -inf)
  } else {
    dz = p * -g;
  }
  dz = dz + onehot_g;
  if constexpr (K == TransformKind::Identity) {
    return dz;
  } else {
    return dz * slope;
  }
}

// The onehot term is applied after the loop, to the target element alone (its input read first:
// out may be y), keeping the loop free of 64-bit index compares (none in SSE2).
template <TransformKind K, bool kEntropy>
DPO_ALWAYS_INLINE void grad_loop(const float* y, int64_t n, const TransformF& t, float max, float log_sum, float g, float ge,
                      float entropy, int64_t target, float* out) {
  const bool holds_target = target >= 0 && target < n;
  const float y_target = holds_target ? y[target] : 0.0f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = grad_element<K, kEntropy>(y[i], t, max, log_sum, g, ge, entropy, 0.0f);
  }
  if (holds_target) out[target] = grad_element<K, kEntropy>(y_target, t, max, log_sum, g, ge, entropy, g);
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

DPO_CPU_CLONES void chunk_transform(const float* y, int64_t n, const TransformF& t, float* z) {
  switch (t.kind) {
    case TransformKind::Identity:
      if (z != y) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) z[i] = y[i];
      }
      break;
    case TransformKind::Scale: transform_loop<TransformKind::Scale>(y, n, t, z); break;
    case TransformKind::Softcap: transform_loop<TransformKind::Softcap>(y, n, t, z); break;
  }
}

void chunk_transform(const double* y, int64_t n, const TransformD& t, double* z) {
  switch (t.kind) {
    case TransformKind::Identity:
      for (int64_t i = 0; i < n; ++i) z[i] = y[i];
      break;
    case TransformKind::Scale:
      for (int64_t i = 0; i < n; ++i) z[i] = (y[i] * t.pre) * t.post;
      break;
    case TransformKind::Softcap:
      for (int64_t i = 0; i < n; ++i) z[i] = (std::tanh((y[i] * t.pre) / t.softcap) * t.softcap) * t.post;
      break;
  }
}

DPO_CPU_CLONES ChunkMoments<float> chunk_moments(const float* z, int64_t n, float shift) {
  float sum = 0.0f, centered = 0.0f, sum_sq = 0.0f, sum_logits = 0.0f;
#pragma omp simd reduction(+ : sum, centered, sum_sq, sum_logits)
  for (int64_t i = 0; i < n; ++i) {
    const float d = z[i] - shift;
    const float e = exp_poly(d);
    // exp_poly flushes below d = -87 to 0: there e * max(d, -87) is exactly 0 (a -inf logit adds 0,
    // not 0 * -inf = NaN), elsewhere it is e * d. The clamp is exp_poly's own (shared once inlined).
    const float d_clamped = select_bits(d < -87.0f, -87.0f, d);
    sum += e;
    centered += e * d_clamped;
    sum_sq += e * e;
    sum_logits += z[i];
  }
  return {sum, centered, sum_sq, sum_logits};
}

ChunkMoments<double> chunk_moments(const double* z, int64_t n, double shift) {
  double sum = 0.0, centered = 0.0, sum_sq = 0.0, sum_logits = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = z[i] - shift;
    const double e = std::exp(d);
    sum += e;
    centered += e == 0.0 ? 0.0 : e * d;
    sum_sq += e * e;
    sum_logits += z[i];
  }
  return {sum, centered, sum_sq, sum_logits};
}

DPO_CPU_CLONES void chunk_logits_grad(const float* y, int64_t n, const TransformF& t, float max, float log_sum,
                                      float g, float ge, float entropy, int64_t target, float* out) {
  const bool with_entropy = ge != 0.0f;
  switch (t.kind) {
    case TransformKind::Identity:
      if (with_entropy) {
        grad_loop<TransformKind::Identity, true>(y, n, t, max, log_sum, g, ge, entropy, target, out);
      } else {
        grad_loop<TransformKind::Identity, false>(y, n, t, max, log_sum, g, ge, entropy, target, out);
      }
      break;
    case TransformKind::Scale:
      if (with_entropy) {
        grad_loop<TransformKind::Scale, true>(y, n, t, max, log_sum, g, ge, entropy, target, out);
      } else {
        grad_loop<TransformKind::Scale, false>(y, n, t, max, log_sum, g, ge, entropy, target, out);
      }
      break;
    case TransformKind::Softcap:
      if (with_entropy) {
        grad_loop<TransformKind::Softcap, true>(y, n, t, max, log_sum, g, ge, entropy, target, out);
      } else {
        grad_loop<TransformKind::Softcap, false>(y, n, t, max, log_sum, g, ge, entropy, target, out);
      }
      break;
  }
}

void chunk_logits_grad(const double* y, int64_t n, const TransformD& t, double max, double log_sum, double g,
                       double ge, double entropy, int64_t target, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    double z, slope;
    switch (t.kind) {
      case TransformKind::Identity:
        z = y[i];
        slope = 1.0;
        break;
      case TransformKind::Scale:
        z = (y[i] * t.pre) * t.post;
        slope = t.post * t.pre;
        break;
      default: {
        const double th = std::tanh((y[i] * t.pre) / t.softcap);
        z = (th * t.softcap) * t.post;
        slope = t.post * t.pre * (1.0 - th * th);
        break;
      }
    }
    const double logp = (z - max) - log_sum;
    const double p = std::exp(logp);
    double dz = p * -(g + ge * (logp + entropy));
    dz = p == 0.0 ? 0.0 : dz;
    if (i == target) dz += g;
    out[i] = dz * slope;
  }
}

}  // namespace dpo::cpu
