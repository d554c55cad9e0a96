// CUDA entry points of the extension, declared for code that is compiled without nvcc.
// csrc/cuda/*.cu define them when CUDA is built; csrc/cuda/no_cuda.cpp stubs them otherwise.
#pragma once

namespace dpo::cuda {

bool built_with_cuda();
const char* built_cuda_version();  // e.g. "13.0", "" without CUDA
const char* built_cuda_archs();    // e.g. "80;90", "" without CUDA
int device_count();                // 0 when no driver or device is present

}  // namespace dpo::cuda
