// pybind11 entry points of the CUDA kernels (compiled by the host compiler, only when CUDA is
// built). Kernels live in the .cu files; this file only converts Python ints to pointers.
#include "cuda_entry_points.h"

namespace dpo::cuda {

void register_entry_points(pybind11::module_& m) { (void)m; }

}  // namespace dpo::cuda
