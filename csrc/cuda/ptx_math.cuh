// The PTX instructions the kernels issue by inline assembly, one function each, so that the host
// emulation (host_emulation/host_ptx_math.h) substitutes a host twin for every one of them.
//   ex2_approx(x)      ex2.approx.f32       2^x, subnormal results kept
//   ex2_approx_ftz(x)  ex2.approx.ftz.f32   2^x, subnormal inputs and results flushed to zero
//   rcp_approx_ftz(x)  rcp.approx.ftz.f32   1 / x, flushed likewise
//   fma_rn(a, b, c)    fma.rn.f32           a * b + c, one rounding, subnormals kept
//   mul_rn(a, b)       mul.rn.f32           a * b, subnormals kept (not contracted into an fma)
// (The build's --use_fast_math makes ordinary fp32 arithmetic flush subnormals; these do not,
// except the .ftz ones.)
#pragma once

#if defined(DPO_HOST_EMULATION)
#include "host_emulation/host_ptx_math.h"
#else

namespace dpo::cuda {

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float ex2_approx_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

}  // namespace dpo::cuda

#endif
