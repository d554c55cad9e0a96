// Stand-ins for the CUDA side when the extension is built without nvcc.
#include "cuda_entry_points.h"

namespace dpo::cuda {

bool built_with_cuda() { return false; }
const char* built_cuda_version() { return ""; }
const char* built_cuda_archs() { return ""; }
int device_count() { return 0; }
void register_entry_points(pybind11::module_&) {}

}  // namespace dpo::cuda
