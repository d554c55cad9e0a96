// Host emulation of the CUDA subset the kernels in csrc/cuda/ use, so that the host C++ compiler
// builds those .cu sources unchanged and runs them on the CPU (backend "cuda_emulated", a test
// backend). The fake <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h> in include/ lead here.
//
// What is modelled:
//  - a launch runs its blocks one after another; a block's threads are cooperatively scheduled
//    fibers (runtime.cpp) that switch only at __syncthreads and at warp intrinsics, in a fixed
//    round-robin order, so a run is deterministic;
//  - threadIdx / blockIdx / blockDim / gridDim (per fiber), __syncthreads (every thread of the
//    block must arrive), __shfl_xor_sync (every lane named by the mask must arrive, the mask must
//    name only lanes that exist), __shared__ variables (static storage, one block at a time);
//  - race detection on shared memory (race_detector.cpp): a read of bytes another thread wrote
//    since the last __syncthreads, a write of bytes another thread read or wrote since then, a
//    read of bytes no thread of the block has written, a diverged barrier or warp intrinsic.
//    The first report fails the launch: check_launch throws std::runtime_error naming the kernel,
//    the block, the threads and the shared variable;
//  - __half / __nv_bfloat16 with round-to-nearest-even conversions (common/dtypes.h, as the GPU),
//    uint4 / float2 / dim3, __ldcs / __stcs (plain accesses), the PTX helpers of ptx_math.cuh
//    (host_ptx_math.h), and the runtime calls of launch_check.cuh (one device of kEmulatedSmCount
//    SMs, so the launchers take the same grid decisions as on an H100).
// What is not: timing, memory ordering weaker than program order, the fast-math approximations of
// ordinary arithmetic (expf, logf, division are the host's accurate ones; fp32 subnormals are kept
// where the GPU build's -ftz flushes them), FMA contraction (the GPU contracts a * b + c, the
// emulation builds with -ffp-contract=off), launch bounds and register limits, and global memory
// bounds (a misaligned 16-byte access still faults, as on the GPU).
#pragma once

// Everything compiled against this header is the emulated build. Its copy of the project's code
// lives in namespace dpo_emulated (dpo::cuda becomes dpo_emulated::cuda), so that no inline
// function compiled with the race detector's instrumentation is merged with the CPU kernels' or
// the GPU build's copy of it at link time. (Include the standard and pybind11 headers first.)
#define dpo dpo_emulated
#define DPO_HOST_EMULATION 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/dtypes.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static storage: one block runs at a time, and race_detector.cpp treats every access of an
// emulated kernel to static storage as a shared-memory access.
#define __shared__ static

namespace cuda_emulation {

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Fails the launch: a 16-byte vector access at an address that is not 16-byte aligned (the GPU
// faults with "misaligned address"; the host would not).
void misaligned_vector_access(const void* address);

// A 16-byte vector. Copying one from or to memory checks the memory's alignment, as the GPU's
// 16-byte loads and stores require (copies between registers are aligned by construction).
struct alignas(16) uint4 {
  unsigned x, y, z, w;

  uint4() = default;
  constexpr uint4(unsigned x_, unsigned y_, unsigned z_, unsigned w_) : x(x_), y(y_), z(z_), w(w_) {}
  uint4(const uint4& other) : x(other.x), y(other.y), z(other.z), w(other.w) { check_alignment(&other); }
  uint4& operator=(const uint4& other) {
    check_alignment(this);
    check_alignment(&other);
    x = other.x;
    y = other.y;
    z = other.z;
    w = other.w;
    return *this;
  }

 private:
  static void check_alignment(const void* p) {
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) misaligned_vector_access(p);
  }
};

struct alignas(8) float2 {
  float x, y;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// The running fiber's coordinates (set by the scheduler at every switch).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

constexpr int kEmulatedSmCount = 132;

// ---- 16-bit floating-point types ----------------------------------------------------------

struct __half {
  unsigned short bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  unsigned short bits;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) { return dpo::fp16_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {dpo::float_to_fp16(f)}; }
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {dpo::float_to_bf16(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// ---- Bit casts and arithmetic intrinsics ----------------------------------------------------

inline float __uint_as_float(unsigned u) { return dpo::bits_to_float(u); }
inline unsigned __float_as_uint(float f) { return dpo::float_to_bits(f); }
inline float __fmul_rn(float a, float b) { return a * b; }

// Flushes an fp32 subnormal to a zero of its sign (the .ftz modifier).
inline float flush_subnormal(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }

// __expf: ex2.approx.ftz.f32 of the fp32 product x * log2(e), as the GPU forms it. The host's
// exp2f is within an ulp of exact, where ex2.approx is within about two. (A macro: glibc declares
// a __expf of its own.)
inline float fast_expf(float x) { return flush_subnormal(std::exp2(flush_subnormal(x * 1.4426950408889634f))); }
#define __expf cuda_emulation::fast_expf

// Cache-hinted accesses are plain accesses on the host.
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T value) {
  *p = value;
}

// ---- Block and warp synchronisation (runtime.cpp) -------------------------------------------

void __syncthreads();

// Exchanges a 32-bit value across the lanes of the calling warp: every lane named by `mask`
// deposits `bits` and receives lane (lane ^ lane_mask)'s. Reports a partial or inconsistent mask.
uint32_t shuffle_xor_bits(unsigned mask, uint32_t bits, int lane_mask);

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "the emulated __shfl_xor_sync moves 32-bit values");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = shuffle_xor_bits(mask, bits, lane_mask);
  std::memcpy(&value, &bits, 4);
  return value;
}

// ---- Runtime API subset of launch_check.cuh -------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);  // the launch's report, for emulation errors
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

// ---- Launch ---------------------------------------------------------------------------------

// Runs body(context) as every thread of every block of the grid (blocks in order, a block's
// threads as fibers). Errors (a bad configuration, a race, a diverged barrier) are kept for
// cudaGetLastError; the remaining blocks are then skipped.
void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* context);

// kernel<<<grid, block, shared_bytes>>>(args...): the arguments are converted to the kernel's
// parameter types once, and every thread gets them by value, as on the GPU. Dynamic shared memory
// is not emulated (no kernel uses it).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  if (shared_bytes != 0) throw std::logic_error("the host emulation has no dynamic shared memory");
  struct Launch {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } launch_args{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  run_grid(grid, block, [](void* context) {
    auto* l = static_cast<Launch*>(context);
    std::apply(l->kernel, l->params);
  }, &launch_args);
}

}  // namespace cuda_emulation

// CUDA's names are global.
using namespace cuda_emulation;
