// The pybind11 module dpo_kernels._C. It does not link libtorch: entry points take raw data
// pointers (Python ints), sizes, strides in elements, dtype codes and, for CUDA, a stream handle.
// Python (dpo_kernels/backends/extension.py) validates arguments and allocates every output.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtypes.h"
#include "common/token_rows.h"
#include "cpu/huge_pages.h"
#include "cpu/tile_epilogues.h"
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

dpo::cpu::TileView make_tile(uintptr_t tile, int dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                             uintptr_t targets) {
  if (dtype < 0 || dtype > static_cast<int>(dpo::DType::Float64)) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
  }
  return dpo::cpu::TileView{reinterpret_cast<void*>(tile), static_cast<dpo::DType>(dtype), rows, chunk, ld, v0,
                            reinterpret_cast<const int64_t*>(targets)};
}

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

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
#ifdef DPO_CUDA_EMULATION
  info["cuda_emulation"] = true;
#else
  info["cuda_emulation"] = false;
#endif
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

  m.def(
      "cpu_tile_fold_stats",
      [](uintptr_t tile, int dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0, uintptr_t targets,
         uintptr_t max, uintptr_t sum_exp, uintptr_t target_logit, uintptr_t centered, uintptr_t sum_sq,
         uintptr_t sum_logits, uintptr_t max_before_target, uintptr_t max_after_target, double pre_scale,
         double softcap, double post_scale, int num_threads) {
        dpo::cpu::TileStatsPtrs stats{as_ptr(max), as_ptr(sum_exp), as_ptr(target_logit), as_ptr(centered),
                                      as_ptr(sum_sq), as_ptr(sum_logits), as_ptr(max_before_target),
                                      as_ptr(max_after_target)};
        dpo::cpu::tile_fold_stats(make_tile(tile, dtype, rows, chunk, ld, v0, targets), stats,
                                  dpo::cpu::LogitTransformParams{pre_scale, softcap, post_scale}, num_threads);
      },
      py::arg("tile"), py::arg("dtype"), py::arg("rows"), py::arg("chunk"), py::arg("ld"), py::arg("v0"),
      py::arg("targets"), py::arg("max"), py::arg("sum_exp"), py::arg("target_logit"), py::arg("centered"),
      py::arg("sum_sq"), py::arg("sum_logits"), py::arg("max_before_target"), py::arg("max_after_target"),
      py::arg("pre_scale"), py::arg("softcap"), py::arg("post_scale"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "Linear path, CPU: fold a [rows, chunk] tile (row stride ld elements, vocabulary entries [v0, v0 + chunk)) "
      "of GEMM outputs y into running per-row statistics of z = transform(y) (see "
      "dpo_kernels/backends/tile_epilogue.py, TileStats). Pointers are data addresses (0: not tracked; max, "
      "sum_exp, target_logit are required); statistics are [rows] contiguous fp32 (float64 for float64 tiles). "
      "The tile is only read.");

  m.def(
      "cpu_tile_logits_grad",
      [](uintptr_t tile, int dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0, uintptr_t targets,
         uintptr_t row_stats, uintptr_t grad, uintptr_t entropy_grad, uintptr_t entropy, double pre_scale,
         double softcap, double post_scale, int num_threads) {
        dpo::cpu::tile_logits_grad(make_tile(tile, dtype, rows, chunk, ld, v0, targets), as_ptr(row_stats),
                                   as_ptr(grad), as_ptr(entropy_grad), as_ptr(entropy),
                                   dpo::cpu::LogitTransformParams{pre_scale, softcap, post_scale}, num_threads);
      },
      py::arg("tile"), py::arg("dtype"), py::arg("rows"), py::arg("chunk"), py::arg("ld"), py::arg("v0"),
      py::arg("targets"), py::arg("row_stats"), py::arg("grad"), py::arg("entropy_grad"), py::arg("entropy"),
      py::arg("pre_scale"), py::arg("softcap"), py::arg("post_scale"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "Linear path, CPU: overwrite a [rows, chunk] tile of GEMM outputs y, in place, with the gradient of "
      "grad[r] * token_logp[r] (+ entropy_grad[r] * entropy[r]) w.r.t. y (see "
      "dpo_kernels/backends/tile_epilogue.py). row_stats [rows, 2] holds (max, log_sum) per row; entropy_grad and "
      "entropy are both given or both 0. Rows with grad == entropy_grad == 0 become zeros unread.");

  dpo::cuda::register_entry_points(m);
#ifdef DPO_CUDA_EMULATION
  dpo_emulated::cuda::register_entry_points(m);
#endif
}
