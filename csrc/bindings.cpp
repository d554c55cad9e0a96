// The pybind11 module dpo_kernels._C. It does not link libtorch: entry points take raw data
// pointers (Python ints), sizes, strides in elements, dtype codes and, for CUDA, a stream handle.
// Python (dpo_kernels/backends/extension.py) validates arguments and allocates every output.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/dtypes.h"
#include "common/token_rows.h"
#include "cpu/huge_pages.h"
#include "cpu/token_logps.h"
#include "cuda/cuda_entry_points.h"

namespace py = pybind11;

namespace {

dpo::TokenRows make_rows(uintptr_t logits, int dtype, int64_t S, int64_t T, int64_t V, int64_t stride_s,
                         int64_t stride_t, uintptr_t targets, int64_t ignore_index) {
  if (dtype < 0 || dtype > static_cast<int>(dpo::DType::Float64)) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
  }
  return dpo::TokenRows{reinterpret_cast<const void*>(logits), static_cast<dpo::DType>(dtype),
                        S, T, V, stride_s, stride_t, reinterpret_cast<const int64_t*>(targets),
                        ignore_index};
}

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["cuda"] = dpo::cuda::built_with_cuda();
  info["cuda_version"] = std::string(dpo::cuda::built_cuda_version());
  info["cuda_archs"] = std::string(dpo::cuda::built_cuda_archs());
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dpo_kernels compiled kernels (raw-pointer entry points; use the dpo_kernels API)";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(dpo::DType::Float32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(dpo::DType::Float16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(dpo::DType::BFloat16);
  m.attr("DTYPE_FLOAT64") = static_cast<int>(dpo::DType::Float64);

  m.def("build_info", &build_info, "How the module was built: OpenMP, compiler, CUDA version and architectures.");
  m.def("cuda_device_count", &dpo::cuda::device_count,
        "CUDA devices visible to the extension's runtime (0 without a driver or without CUDA support).");

  m.def("cpu_advise_huge_pages", &dpo::cpu::advise_huge_pages, py::arg("ptr"), py::arg("nbytes"),
        "Back a fresh CPU buffer with transparent huge pages when first touched (Linux; no-op elsewhere).");

  m.def(
      "cpu_token_logps_forward",
      [](uintptr_t logits, int dtype, int64_t S, int64_t T, int64_t V, int64_t stride_s, int64_t stride_t,
         uintptr_t targets, int64_t ignore_index, uintptr_t token_logps, uintptr_t row_stats,
         int num_threads) {
        dpo::cpu::token_logps_forward(make_rows(logits, dtype, S, T, V, stride_s, stride_t, targets, ignore_index),
                                      reinterpret_cast<void*>(token_logps), reinterpret_cast<void*>(row_stats), num_threads);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("S"), py::arg("T"), py::arg("V"), py::arg("stride_s"),
      py::arg("stride_t"), py::arg("targets"), py::arg("ignore_index"), py::arg("token_logps"),
      py::arg("row_stats"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "cpu_token_logps_backward",
      [](uintptr_t logits, int dtype, int64_t S, int64_t T, int64_t V, int64_t stride_s, int64_t stride_t,
         uintptr_t targets, int64_t ignore_index, uintptr_t row_stats, uintptr_t grad, uintptr_t out,
         int64_t out_stride_s, int64_t out_stride_t, int num_threads) {
        dpo::cpu::token_logps_backward(make_rows(logits, dtype, S, T, V, stride_s, stride_t, targets, ignore_index),
                                       reinterpret_cast<const void*>(row_stats), reinterpret_cast<const void*>(grad),
                                       reinterpret_cast<void*>(out), out_stride_s, out_stride_t, num_threads);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("S"), py::arg("T"), py::arg("V"), py::arg("stride_s"),
      py::arg("stride_t"), py::arg("targets"), py::arg("ignore_index"), py::arg("row_stats"),
      py::arg("grad"), py::arg("out"), py::arg("out_stride_s"), py::arg("out_stride_t"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>());

  dpo::cuda::register_entry_points(m);
}
