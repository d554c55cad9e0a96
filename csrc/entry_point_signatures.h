// The Python-facing signatures of the four kernel entry points, shared by every set of bindings:
// csrc/bindings.cpp (cpu_*), csrc/cuda/cuda_bindings.cpp (cuda_*) and, through it, the CUDA host
// emulation (cuda_emulated_*). Pointers arrive as Python ints, dtypes as codes (dpo::DType),
// strides in elements. Each backend passes a callable that receives the decoded arguments plus
// its own last argument (`num_threads` for the CPU kernels, the `stream` handle for CUDA), and the
// py::arg naming that last argument. The callable runs with the GIL released.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/dtypes.h"
#include "common/token_rows.h"

namespace dpo::entry_points {

namespace py = pybind11;

inline DType dtype_from_code(int code) {
  if (code < 0 || code > static_cast<int>(DType::Float64)) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

template <typename P = void>
P* as_ptr(uintptr_t value) {
  return reinterpret_cast<P*>(value);
}

// A [rows, chunk] tile of GEMM outputs of the linear path (row stride ld, vocabulary [v0, v0 + chunk)).
struct Tile {
  uintptr_t data;
  DType dtype;
  int64_t rows, chunk, ld, v0;
  uintptr_t targets;  // int64 [rows], global vocabulary indices
};

// Running per-row statistics of a tile fold (0: not tracked; max, sum_exp, target_logit required).
struct TileStatPtrs {
  uintptr_t max, sum_exp, target_logit, centered, sum_sq, sum_logits, max_before_target, max_after_target;
};

// The logit transform z = post_scale * softcap * tanh(pre_scale * y / softcap) (softcap > 0) or
// post_scale * pre_scale * y.
struct Transform {
  double pre_scale, softcap, post_scale;
};

// name(logits, dtype, S, T, V, stride_s, stride_t, targets, ignore_index, rest...) -> f(TokenRows, rest...)
template <typename... Rest, typename F, typename... Extra>
void def_on_token_rows(py::module_& m, const char* name, F f, Extra&&... extra) {
  m.def(
      name,
      [f](uintptr_t logits, int dtype, int64_t S, int64_t T, int64_t V, int64_t stride_s, int64_t stride_t,
          uintptr_t targets, int64_t ignore_index, Rest... rest) {
        f(TokenRows{as_ptr<const void>(logits), dtype_from_code(dtype), S, T, V, stride_s, stride_t,
                    as_ptr<const int64_t>(targets), ignore_index},
          rest...);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("S"), py::arg("T"), py::arg("V"), py::arg("stride_s"),
      py::arg("stride_t"), py::arg("targets"), py::arg("ignore_index"), std::forward<Extra>(extra)...,
      py::call_guard<py::gil_scoped_release>());
}

// name(tile, dtype, rows, chunk, ld, v0, targets, rest..., pre_scale=1, softcap=0, post_scale=1, last)
// -> f(Tile, rest..., Transform, last)
template <typename... Rest, typename F, typename... Extra>
void def_on_tile(py::module_& m, const char* name, F f, Extra&&... extra) {
  m.def(
      name,
      [f](uintptr_t tile, int dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0, uintptr_t targets,
          Rest... rest) { f(Tile{tile, dtype_from_code(dtype), rows, chunk, ld, v0, targets}, rest...); },
      py::arg("tile"), py::arg("dtype"), py::arg("rows"), py::arg("chunk"), py::arg("ld"), py::arg("v0"),
      py::arg("targets"), std::forward<Extra>(extra)..., py::call_guard<py::gil_scoped_release>());
}

// name(logits, dtype, S, T, V, stride_s, stride_t, targets, ignore_index, token_logps, row_stats, stats, last)
// -> f(TokenRows, token_logps, row_stats, stats, last). stats 0: the plain forward (token_logps, row_stats);
// else only the [S, T, 8] extras statistics (token_logps and row_stats 0).
template <typename Last, typename F, typename LastArg>
void def_token_logps_forward(py::module_& m, const char* name, F f, LastArg last_arg, const char* doc) {
  def_on_token_rows<uintptr_t, uintptr_t, uintptr_t, Last>(m, name, f, py::arg("token_logps"), py::arg("row_stats"),
                                                           py::arg("stats"), std::move(last_arg), doc);
}

// name(logits, ..., ignore_index, row_stats, grad, entropy_grad, entropy, out, out_stride_s, out_stride_t, last)
// -> f(TokenRows, row_stats, grad, entropy_grad, entropy, out, out_stride_s, out_stride_t, last).
// entropy_grad and entropy: both 0, or both given (the entropy's gradient joins).
template <typename Last, typename F, typename LastArg>
void def_token_logps_backward(py::module_& m, const char* name, F f, LastArg last_arg, const char* doc) {
  def_on_token_rows<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t, Last>(
      m, name, f, py::arg("row_stats"), py::arg("grad"), py::arg("entropy_grad"), py::arg("entropy"), py::arg("out"),
      py::arg("out_stride_s"), py::arg("out_stride_t"), std::move(last_arg), doc);
}

// name(tile, ..., targets, max, sum_exp, target_logit, centered=0, sum_sq=0, sum_logits=0,
//      max_before_target=0, max_after_target=0, pre_scale=1, softcap=0, post_scale=1, last)
// -> f(Tile, TileStatPtrs, Transform, last)
template <typename Last, typename F, typename LastArg>
void def_tile_fold_stats(py::module_& m, const char* name, F f, LastArg last_arg, const char* doc) {
  using U = uintptr_t;
  def_on_tile<U, U, U, U, U, U, U, U, double, double, double, Last>(
      m, name,
      [f](const Tile& tile, U max, U sum_exp, U target_logit, U centered, U sum_sq, U sum_logits, U before, U after,
          double pre_scale, double softcap, double post_scale, Last last) {
        f(tile, TileStatPtrs{max, sum_exp, target_logit, centered, sum_sq, sum_logits, before, after},
          Transform{pre_scale, softcap, post_scale}, last);
      },
      py::arg("max"), py::arg("sum_exp"), py::arg("target_logit"), py::arg("centered") = 0, py::arg("sum_sq") = 0,
      py::arg("sum_logits") = 0, py::arg("max_before_target") = 0, py::arg("max_after_target") = 0,
      py::arg("pre_scale") = 1.0, py::arg("softcap") = 0.0, py::arg("post_scale") = 1.0, std::move(last_arg), doc);
}

// name(tile, ..., targets, row_stats, grad, entropy_grad=0, entropy=0, pre_scale=1, softcap=0,
//      post_scale=1, last) -> f(Tile, row_stats, grad, entropy_grad, entropy, Transform, last)
template <typename Last, typename F, typename LastArg>
void def_tile_logits_grad(py::module_& m, const char* name, F f, LastArg last_arg, const char* doc) {
  def_on_tile<uintptr_t, uintptr_t, uintptr_t, uintptr_t, double, double, double, Last>(
      m, name,
      [f](const Tile& tile, uintptr_t row_stats, uintptr_t grad, uintptr_t entropy_grad, uintptr_t entropy,
          double pre_scale, double softcap, double post_scale,
          Last last) { f(tile, row_stats, grad, entropy_grad, entropy, Transform{pre_scale, softcap, post_scale}, last); },
      py::arg("row_stats"), py::arg("grad"), py::arg("entropy_grad") = 0, py::arg("entropy") = 0,
      py::arg("pre_scale") = 1.0, py::arg("softcap") = 0.0, py::arg("post_scale") = 1.0, std::move(last_arg), doc);
}

}  // namespace dpo::entry_points
