// The entry points of csrc/cuda/cuda_bindings.cpp bound to the emulated kernels, as
// cuda_emulated_* (dpo_emulated::cuda::register_entry_points, see cuda_entry_points.h).
#include <pybind11/pybind11.h>

#include "cuda/host_emulation/cuda_emulation.h"
#define DPO_CUDA_ENTRY_PREFIX "cuda_emulated_"
#include "cuda/cuda_bindings.cpp"
