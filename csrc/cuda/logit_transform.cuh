// The element-wise maps y -> z from a linear-path tile (a GEMM output) to the logits the softmax
// sees (contract: LogitTransform in kernel_launchers.h, dpo_kernels/backends/tile_epilogue.py):
//   IdentityTransform  z = y                                  (the logits path; compiles away)
//   ScaleTransform     z = (pre_scale * post_scale) * y
//   SoftcapTransform   z = (post_scale * softcap) * tanh((pre_scale / softcap) * y)
// all in fp32, with the parameters folded into fp32 factors on the host (make_* below). Every
// transform provides operator()(y) -> z, `scale_grad(g)` (g times the constant factor of dz/dy:
// pre_scale * post_scale, nothing for the identity), and the softcap one `value_and_sech2(y, s)`
// (z, and s = 1 - tanh^2 of its argument, the rest of dz/dy). kIdentity / kSoftcap let device code
// drop per-element work at compile time.
//
// tanh is computed here rather than by tanhf: the build's --use_fast_math turns tanhf into
// tanh.approx.f32 (relative error ~2^-11), far above the few fp32 roundings the statistics allow.
#pragma once

#include <cmath>
#include <cstdint>

#include "ptx_math.cuh"

namespace dpo::cuda {

struct IdentityTransform {
  static constexpr bool kIdentity = true;
  static constexpr bool kSoftcap = false;
  __device__ __forceinline__ float operator()(float y) const { return y; }
  __device__ __forceinline__ float scale_grad(float g) const { return g; }
};

// z = c * y with c = pre_scale * post_scale carried as hi + lo (hi = fp32(c), lo = fp32(c - hi)):
// fma(y, hi, y * lo) is the correctly rounded fp32 product of y and the double c except within
// ~2^-48 relative of a rounding boundary (an fp32 product y * hi alone can be off by one ulp), so
// z matches the float64 reference rounded to fp32 for the exact statistics (max, before / after
// the target). lo == 0 when c is an fp32 value.
struct ScaleTransform {
  static constexpr bool kIdentity = false;
  static constexpr bool kSoftcap = false;
  float hi;
  float lo;
  __device__ __forceinline__ float operator()(float y) const { return fmaf(y, hi, __fmul_rn(y, lo)); }
  __device__ __forceinline__ float scale_grad(float g) const { return g * hi; }
};

struct TanhParts {
  float tanh;   // tanh(x)
  float sech2;  // 1 - tanh(x)^2, without cancellation where tanh saturates
};

// tanh(x) within a few fp32 ulps, and 1 - tanh(x)^2 with a small relative error, branch-free.
// |x| < 0.6: CUDA's tanhf odd polynomial x + x^3 P(x^2) (its accurate, non-fast-math path) and
// 1 - t^2 (t <= 0.54: no cancellation). |x| >= 0.6: from e = exp(-2|x|) in (0, 0.3],
// tanh = sign(x) (1 - 2 e / (1 + e)) and 1 - tanh^2 = 4 e / (1 + e)^2 (neither overflows; e
// underflows to 0 at |x| > ~44, giving 1 and 0). Two MUFU operations (ex2, rcp). NaN propagates;
// +-inf gives +-1 and 0.
__device__ __forceinline__ TanhParts tanh_parts(float x) {
  const float a = fabsf(x);
  const float e = ex2_approx_ftz(a * -2.88539004f);  // exp(-2a) = 2^(-2 a log2(e))
  const float q = rcp_approx_ftz(1.f + e);
  const float t_big = fmaf(-2.f * e, q, 1.f);
  const float s_big = (4.f * e) * (q * q);

  const float x2 = x * x;
  float poly = fmaf(0.0157396831f, x2, -0.0523039624f);
  poly = fmaf(poly, x2, 0.133152977f);
  poly = fmaf(poly, x2, -0.333327681f);
  const float t_small = fmaf(poly * x2, x, x);

  const bool small = a < 0.600000024f;
  return {small ? t_small : copysignf(t_big, x), small ? fmaf(-t_small, t_small, 1.f) : s_big};
}

// z = out_scale * tanh(in_scale * y) with in_scale = pre_scale / softcap, out_scale = softcap *
// post_scale; dz/dy = grad_scale * (1 - tanh^2) with grad_scale = pre_scale * post_scale. The
// products are __fmul_rn so that no caller's arithmetic is contracted into them: the target logit
// and the same element inside the stream are then the same fp32 value.
struct SoftcapTransform {
  static constexpr bool kIdentity = false;
  static constexpr bool kSoftcap = true;
  float in_scale;
  float out_scale;
  float grad_scale;
  __device__ __forceinline__ float operator()(float y) const {
    return __fmul_rn(out_scale, tanh_parts(__fmul_rn(in_scale, y)).tanh);
  }
  __device__ __forceinline__ float value_and_sech2(float y, float& sech2) const {
    const TanhParts t = tanh_parts(__fmul_rn(in_scale, y));
    sech2 = t.sech2;
    return __fmul_rn(out_scale, t.tanh);
  }
  __device__ __forceinline__ float scale_grad(float g) const { return g * grad_scale; }
};

}  // namespace dpo::cuda
