// CUDA side of the extension as seen from the (nvcc-free) pybind11 module.
// With CUDA, csrc/cuda/runtime_info.cu and csrc/cuda/cuda_bindings.cpp define these; without it,
// csrc/cuda/no_cuda.cpp stubs them.
#pragma once

#include <pybind11/pybind11.h>

namespace dpo::cuda {

bool built_with_cuda();
const char* built_cuda_version();  // e.g. "13.0", "" without CUDA
const char* built_cuda_archs();    // e.g. "80,90", "" without CUDA
int device_count();                // 0 when no driver or device is present

// Adds the CUDA kernel entry points (cuda_*) to the module; nothing without CUDA.
void register_entry_points(pybind11::module_& m);

}  // namespace dpo::cuda

// The same entry points bound to the kernels' host emulation, as cuda_emulated_*
// (csrc/cuda/host_emulation/; built when CMake sets DPO_CUDA_EMULATION). The emulation build
// compiles the project's code in namespace dpo_emulated.
namespace dpo_emulated::cuda {
void register_entry_points(pybind11::module_& m);
// cuda_emulated_check_detector: kernels with deliberate races that show the detectors work.
void register_detector_checks(pybind11::module_& m);
}  // namespace dpo_emulated::cuda
