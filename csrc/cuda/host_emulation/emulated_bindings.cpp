// The entry points of csrc/cuda/cuda_bindings.cpp bound to the emulated kernels, as
// cuda_emulated_* (dpo_emulated::cuda::register_entry_points, see cuda_entry_points.h), and the
// emulation's detector checks (tests only).
#include <pybind11/pybind11.h>

#include "cuda/host_emulation/cuda_emulation.h"
#define DPO_CUDA_ENTRY_PREFIX "cuda_emulated_"
#include "cuda/cuda_bindings.cpp"
#include "cuda/host_emulation/detector_checks.h"

namespace dpo::cuda {

void register_detector_checks(pybind11::module_& m) {
  m.def("cuda_emulated_check_detector", &check_detector, pybind11::arg("name"),
        "Runs one of the CUDA host emulation's detector-check kernels (tests only): RuntimeError with the "
        "emulation's report when it finds a defect.");
}

}  // namespace dpo::cuda
