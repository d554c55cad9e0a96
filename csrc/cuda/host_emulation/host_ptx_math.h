// Host twins of csrc/cuda/ptx_math.cuh for the emulation build. Rounding: fma_rn and mul_rn are
// exact twins (IEEE fp32, one rounding; the emulation builds with -ffp-contract=off). The .approx
// instructions are replaced by the host's accurate exp2f and division: ex2.approx is within about
// two ulps of 2^x and rcp.approx within one of 1 / x, so the emulation can differ from the GPU by
// those few ulps (the tests' bounds allow several fp32 roundings per element). The .ftz variants
// flush subnormal inputs and results to zero, as the GPU does.
#pragma once

#include <cmath>

#include "cuda/host_emulation/cuda_emulation.h"

namespace dpo::cuda {

inline float ex2_approx(float x) { return std::exp2(x); }
inline float ex2_approx_ftz(float x) { return flush_subnormal(std::exp2(flush_subnormal(x))); }
inline float rcp_approx_ftz(float x) { return flush_subnormal(1.f / flush_subnormal(x)); }
inline float fma_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float mul_rn(float a, float b) { return a * b; }

}  // namespace dpo::cuda
