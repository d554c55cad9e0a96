// Small kernels, each with one deliberate defect, that show the emulation's detectors at work
// (python_tests/backends/test_cuda_emulation.py), plus a correct one that must pass.
// check_detector(name) runs kernel `name` on one block of 64 threads and throws std::runtime_error
// with the emulation's report when the launch fails (emulated_bindings.cpp exposes it as
// cuda_emulated_check_detector). Compiled like the kernel sources (ThreadSanitizer
// instrumentation), so their shared-memory accesses are checked.
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/host_emulation/cuda_emulation.h"
#include "cuda/host_emulation/detector_checks.h"

namespace dpo::cuda {
namespace {

constexpr int kThreads = 64;

// Correct: every thread writes its slot, a barrier, then reads its neighbour's.
__global__ void neighbour_exchange(float* out) {
  __shared__ float slots[kThreads];
  slots[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % kThreads];
}

// The same without the barrier: a read of a slot another thread wrote in the same interval.
__global__ void missing_barrier(float* out) {
  __shared__ float slots[kThreads];
  slots[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = slots[(threadIdx.x + 1) % kThreads];
}

// Every thread writes the same slot.
__global__ void write_write(float* out) {
  __shared__ float slot;
  slot = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = slot;
}

// Slot 0 is never written.
__global__ void uninitialised_read(float* out) {
  __shared__ float slots[kThreads];
  if (threadIdx.x > 0) slots[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = slots[0];
}

// Half of each warp calls a full-warp shuffle.
__global__ void partial_warp_shuffle(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// A barrier only the first warp reaches.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 0.f;
}

// A 16-byte load 4 bytes past a 16-byte boundary.
__global__ void misaligned_vector(float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(out + 4 * (threadIdx.x / 4) + 1);
  out[threadIdx.x] = __uint_as_float(v.x);
}

}  // namespace

void check_detector(const std::string& name) {
  void (*kernel)(float*) = nullptr;
  if (name == "neighbour_exchange") kernel = neighbour_exchange;
  if (name == "missing_barrier") kernel = missing_barrier;
  if (name == "write_write") kernel = write_write;
  if (name == "uninitialised_read") kernel = uninitialised_read;
  if (name == "partial_warp_shuffle") kernel = partial_warp_shuffle;
  if (name == "divergent_barrier") kernel = divergent_barrier;
  if (name == "misaligned_vector") kernel = misaligned_vector;
  if (kernel == nullptr) throw std::invalid_argument("no detector check named '" + name + "'");
  std::vector<float> out(kThreads + 4);
  cuda_emulation::launch(kernel, dim3(1), dim3(kThreads), 0, out.data());
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error("CUDA kernel " + name + " failed: " + cudaGetErrorString(err));
}

}  // namespace dpo::cuda
