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
#include "entry_point_signatures.h"

namespace py = pybind11;

namespace {

using dpo::entry_points::as_ptr;

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

  namespace ep = dpo::entry_points;
  ep::def_token_logps_forward<int>(
      m, "cpu_token_logps_forward",
      [](const dpo::TokenRows& rows, uintptr_t token_logps, uintptr_t row_stats, uintptr_t stats, int num_threads) {
        dpo::cpu::token_logps_forward(rows, as_ptr(token_logps), as_ptr(row_stats), as_ptr(stats), num_threads);
      },
      py::arg("num_threads"),
      "Logits path, CPU: per row (s, t) the log-prob of its target and its (max, log_sum) pair (fp32; float64 for "
      "float64 logits); see cuda_token_logps_forward for the layout. stats: 0 for the plain forward, else the "
      "[S, T, 8] extras statistics it writes instead (token_logps.h).");

  ep::def_token_logps_backward<int>(
      m, "cpu_token_logps_backward",
      [](const dpo::TokenRows& rows, uintptr_t row_stats, uintptr_t grad, uintptr_t entropy_grad, uintptr_t entropy,
         uintptr_t out, int64_t out_stride_s, int64_t out_stride_t, int num_threads) {
        dpo::cpu::token_logps_backward(rows, as_ptr<const void>(row_stats), as_ptr<const void>(grad),
                                       as_ptr(entropy_grad), as_ptr(entropy), as_ptr(out), out_stride_s,
                                       out_stride_t, num_threads);
      },
      py::arg("num_threads"),
      "Logits path, CPU: the logits gradient grad[s, t] * (onehot - p) into `out` (may be the logits themselves); "
      "with entropy_grad and entropy (both given, or both 0) the entropy's gradient joins.");

  ep::def_tile_fold_stats<int>(
      m, "cpu_tile_fold_stats",
      [](const ep::Tile& tile, const ep::TileStatPtrs& p, const ep::Transform& t, int num_threads) {
        dpo::cpu::TileStatsPtrs stats{as_ptr(p.max),        as_ptr(p.sum_exp),           as_ptr(p.target_logit),
                                      as_ptr(p.centered),   as_ptr(p.sum_sq),            as_ptr(p.sum_logits),
                                      as_ptr(p.max_before_target), as_ptr(p.max_after_target)};
        dpo::cpu::tile_fold_stats(
            dpo::cpu::TileView{as_ptr(tile.data), tile.dtype, tile.rows, tile.chunk, tile.ld, tile.v0,
                               as_ptr<const int64_t>(tile.targets)},
            stats, dpo::cpu::LogitTransformParams{t.pre_scale, t.softcap, t.post_scale}, num_threads);
      },
      py::arg("num_threads"),
      "Linear path, CPU: fold a [rows, chunk] tile (row stride ld elements, vocabulary entries [v0, v0 + chunk)) "
      "of GEMM outputs y into running per-row statistics of z = transform(y) (see "
      "dpo_kernels/backends/tile_epilogue.py, TileStats). Pointers are data addresses (0: not tracked; max, "
      "sum_exp, target_logit are required); statistics are [rows] contiguous fp32 (float64 for float64 tiles). "
      "The tile is only read.");

  ep::def_tile_logits_grad<int>(
      m, "cpu_tile_logits_grad",
      [](const ep::Tile& tile, uintptr_t row_stats, uintptr_t grad, uintptr_t entropy_grad, uintptr_t entropy,
         const ep::Transform& t, int num_threads) {
        dpo::cpu::tile_logits_grad(
            dpo::cpu::TileView{as_ptr(tile.data), tile.dtype, tile.rows, tile.chunk, tile.ld, tile.v0,
                               as_ptr<const int64_t>(tile.targets)},
            as_ptr(row_stats), as_ptr(grad), as_ptr(entropy_grad), as_ptr(entropy),
            dpo::cpu::LogitTransformParams{t.pre_scale, t.softcap, t.post_scale}, num_threads);
      },
      py::arg("num_threads"),
      "Linear path, CPU: overwrite a [rows, chunk] tile of GEMM outputs y, in place, with the gradient of "
      "grad[r] * token_logp[r] (+ entropy_grad[r] * entropy[r]) w.r.t. y (see "
      "dpo_kernels/backends/tile_epilogue.py). row_stats [rows, 2] holds (max, log_sum) per row; entropy_grad and "
      "entropy are both given or both 0. Rows with grad == entropy_grad == 0 become zeros unread.");

  dpo::cuda::register_entry_points(m);
#ifdef DPO_CUDA_EMULATION
  dpo_emulated::cuda::register_entry_points(m);
  dpo_emulated::cuda::register_detector_checks(m);
#endif
}
