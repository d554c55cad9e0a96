// Host-side helpers every launcher uses: dtype dispatch to the kernel element types, the checks
// run before a launch (std::invalid_argument) and after it (std::runtime_error naming the kernel,
// the dtype and the shapes), the SM count of the current device, and launch_kernel, the one
// launch site of every kernel (the host emulation, host_emulation/, runs it on the CPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/dtypes.h"

namespace dpo::cuda {

inline size_t element_bytes(DType dtype) {
  switch (dtype) {
    case DType::Float64: return 8;
    case DType::Float32: return 4;
    default: return 2;
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the kernel element type of `dtype` (float, __nv_bfloat16, __half).
// float64 has no CUDA kernel: std::invalid_argument naming the kernel.
template <typename F>
void dispatch_dtype(DType dtype, const char* kernel, F&& f) {
  switch (dtype) {
    case DType::Float32: f(TypeTag<float>{}); return;
    case DType::BFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::Float16: f(TypeTag<__half>{}); return;
    default: break;
  }
  throw std::invalid_argument(std::string(kernel) + ": the CUDA kernels take float32, bfloat16 or float16 logits, got " +
                              dtype_name(dtype));
}

// The data pointer of a logits buffer must be aligned to its element size (every PyTorch tensor
// is): the kernels peel rows to 16-byte boundaries in whole elements.
inline void check_element_aligned(const void* p, DType dtype, const char* kernel, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % element_bytes(dtype) != 0) {
    throw std::invalid_argument(std::string(kernel) + ": " + what + " pointer is not aligned to its " +
                                dtype_name(dtype) + " element size");
  }
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...); in the host emulation build, the same
// launch run by the emulation's scheduler (synchronously; the stream is ignored).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
#if defined(DPO_HOST_EMULATION)
  (void)stream;
  cuda_emulation::launch(kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

// `shapes` is a callable returning the shapes as text, evaluated only when a check fails.
template <typename Shapes>
void check_grid(int64_t value, int64_t limit, const char* kernel, const char* what, const Shapes& shapes) {
  if (value > limit) {
    throw std::invalid_argument(std::string(kernel) + ": " + what + " (" + std::to_string(value) +
                                ") exceeds the CUDA grid limit " + std::to_string(limit) + " (" + shapes() + ")");
  }
}

// After a launch: throws std::runtime_error with the kernel, the dtype and the shapes when the
// launch (or an earlier asynchronous error of this runtime) failed.
template <typename Shapes>
void check_launch(const char* kernel, DType dtype, const Shapes& shapes) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA kernel ") + kernel + " failed (dtype " + dtype_name(dtype) + ", " +
                             shapes() + "): " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// Streaming multiprocessors of the current device (the caller sets it: Python runs under
// torch.cuda.device(...)).
inline int current_sm_count(const char* kernel) {
  int device = 0;
  int count = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not a launch failure: keep it out of the next check_launch
    throw std::runtime_error(std::string("CUDA kernel ") + kernel + ": cannot query the current device: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
  return count;
}

}  // namespace dpo::cuda
