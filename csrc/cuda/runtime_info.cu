// Build and runtime facts of the CUDA part of the extension.
#include <cuda_runtime.h>

#include "cuda_entry_points.h"

#ifndef DPO_CUDA_VERSION
#define DPO_CUDA_VERSION ""
#endif
#ifndef DPO_CUDA_ARCHS
#define DPO_CUDA_ARCHS ""
#endif

namespace dpo::cuda {

bool built_with_cuda() { return true; }
const char* built_cuda_version() { return DPO_CUDA_VERSION; }
const char* built_cuda_archs() { return DPO_CUDA_ARCHS; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" / "no device" error
    return 0;
  }
  return count;
}

}  // namespace dpo::cuda
