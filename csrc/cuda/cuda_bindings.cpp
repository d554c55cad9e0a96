// pybind11 entry points of the CUDA kernels (compiled by the host compiler, only when CUDA is
// built). Pointers and the cudaStream_t handle arrive as Python ints; the launch functions are in
// the .cu files (kernel_launchers.h states each contract). Every entry point releases the GIL and
// returns once its kernel is enqueued; errors surface as ValueError (bad arguments, before any
// launch) or RuntimeError (a failed launch, naming the kernel, the dtype and the shapes).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtypes.h"
#include "common/token_rows.h"
#include "cuda_entry_points.h"
#include "kernel_launchers.h"

namespace py = pybind11;

// Entry points are named cuda_<kernel>; the host emulation build binds them as cuda_emulated_<kernel>.
#ifndef DPO_CUDA_ENTRY_PREFIX
#define DPO_CUDA_ENTRY_PREFIX "cuda_"
#endif

namespace dpo::cuda {
namespace {

DType dtype_from_code(int code) {
  if (code < 0 || code > static_cast<int>(DType::Float64)) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

TokenRows rows_from(uintptr_t logits, int dtype, int64_t S, int64_t T, int64_t V, int64_t stride_s, int64_t stride_t,
                    uintptr_t targets, int64_t ignore_index) {
  return TokenRows{reinterpret_cast<const void*>(logits), dtype_from_code(dtype), S, T, V, stride_s, stride_t,
                   reinterpret_cast<const int64_t*>(targets), ignore_index};
}

template <typename P>
P* as_ptr(uintptr_t value) {
  return reinterpret_cast<P*>(value);
}

void* as_stream(uintptr_t value) { return reinterpret_cast<void*>(value); }

}  // namespace

void register_entry_points(py::module_& m) {
  m.def(
      DPO_CUDA_ENTRY_PREFIX "token_logps_forward",
      [](uintptr_t logits, int dtype, int64_t S, int64_t T, int64_t V, int64_t stride_s, int64_t stride_t,
         uintptr_t targets, int64_t ignore_index, uintptr_t token_logps, uintptr_t row_stats, uintptr_t stream) {
        token_logps_forward(rows_from(logits, dtype, S, T, V, stride_s, stride_t, targets, ignore_index),
                            as_ptr<float>(token_logps), as_ptr<float>(row_stats), as_stream(stream));
      },
      py::arg("logits"), py::arg("dtype"), py::arg("S"), py::arg("T"), py::arg("V"), py::arg("stride_s"),
      py::arg("stride_t"), py::arg("targets"), py::arg("ignore_index"), py::arg("token_logps"),
      py::arg("row_stats"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "row_stats[s, t] = (m, log_sum) with m = max(logits[s, t, :]) and log_sum = log(sum(exp(logits[s, t, :] - m))) "
      "(fp32 [S, T, 2], interleaved), token_logps[s, t] = (logits[s, t, target] - m) - log_sum (fp32 [S, T]); 0, 0 "
      "and 0 for masked rows, -inf, -inf and NaN for a row of -inf logits. Enqueued on `stream`. logits: "
      "fp32/bf16/fp16 device pointer, row (s, t) at s * stride_s + t * stride_t elements; targets: int64 "
      "contiguous [S, T].");

  m.def(
      DPO_CUDA_ENTRY_PREFIX "token_logps_backward",
      [](uintptr_t logits, int dtype, int64_t S, int64_t T, int64_t V, int64_t stride_s, int64_t stride_t,
         uintptr_t targets, int64_t ignore_index, uintptr_t row_stats, uintptr_t grad, uintptr_t out,
         int64_t out_stride_s, int64_t out_stride_t, uintptr_t stream) {
        token_logps_backward(rows_from(logits, dtype, S, T, V, stride_s, stride_t, targets, ignore_index),
                             as_ptr<const float>(row_stats), as_ptr<const float>(grad), as_ptr<void>(out),
                             out_stride_s, out_stride_t, as_stream(stream));
      },
      py::arg("logits"), py::arg("dtype"), py::arg("S"), py::arg("T"), py::arg("V"), py::arg("stride_s"),
      py::arg("stride_t"), py::arg("targets"), py::arg("ignore_index"), py::arg("row_stats"),
      py::arg("grad"), py::arg("out"), py::arg("out_stride_s"), py::arg("out_stride_t"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "out[s, t, v] = grad[s, t] * (onehot(v == target) - exp((logits[s, t, v] - m) - log_sum)) in the logits' dtype, "
      "(m, log_sum) = row_stats[s, t] as the forward wrote them (fp32 [S, T, 2]); zero rows for masked tokens and "
      "grad == 0. Enqueued on `stream`; out may be the logits themselves.");

  m.def(
      DPO_CUDA_ENTRY_PREFIX "tile_fold_stats",
      [](uintptr_t tile, int dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0, uintptr_t targets,
         uintptr_t max, uintptr_t sum_exp, uintptr_t target_logit, uintptr_t centered, uintptr_t sum_sq,
         uintptr_t sum_logits, uintptr_t max_before_target, uintptr_t max_after_target, double pre_scale,
         double softcap, double post_scale, uintptr_t stream) {
        const TileStats stats{as_ptr<float>(max),        as_ptr<float>(sum_exp),           as_ptr<float>(target_logit),
                              as_ptr<float>(centered),   as_ptr<float>(sum_sq),            as_ptr<float>(sum_logits),
                              as_ptr<float>(max_before_target), as_ptr<float>(max_after_target)};
        tile_fold_stats(as_ptr<const void>(tile), dtype_from_code(dtype), rows, chunk, ld, v0,
                        as_ptr<const int64_t>(targets), stats, LogitTransform{pre_scale, softcap, post_scale},
                        as_stream(stream));
      },
      py::arg("tile"), py::arg("dtype"), py::arg("rows"), py::arg("chunk"), py::arg("ld"), py::arg("v0"),
      py::arg("targets"), py::arg("max"), py::arg("sum_exp"), py::arg("target_logit"), py::arg("centered") = 0,
      py::arg("sum_sq") = 0, py::arg("sum_logits") = 0, py::arg("max_before_target") = 0,
      py::arg("max_after_target") = 0, py::arg("pre_scale") = 1.0, py::arg("softcap") = 0.0,
      py::arg("post_scale") = 1.0, py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
      "Fold a [rows, chunk] tile of GEMM outputs y (fp32/bf16/fp16 device pointer; vocabulary [v0, v0 + chunk), "
      "row stride ld) into running per-row fp32 statistics of the logits z = post_scale * softcap * "
      "tanh(pre_scale * y / softcap) (softcap > 0) or post_scale * pre_scale * y (softcap == 0), computed in fp32: "
      "max, sum_exp, target_logit (required), and the optional extras centered, sum_sq, sum_logits, "
      "max_before_target, max_after_target (0 = not tracked). targets: int64 [rows], global vocabulary indices. "
      "Enqueued on `stream`. See csrc/cuda/kernel_launchers.h for initial values and how to finish token_logp, "
      "entropy, log_sum_sq_probs, mean_logits and is_top1.");

  m.def(
      DPO_CUDA_ENTRY_PREFIX "tile_logits_grad",
      [](uintptr_t tile, int dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0, uintptr_t targets,
         uintptr_t row_stats, uintptr_t grad, uintptr_t entropy_grad, uintptr_t entropy, double pre_scale,
         double softcap, double post_scale, uintptr_t stream) {
        tile_logits_grad(as_ptr<void>(tile), dtype_from_code(dtype), rows, chunk, ld, v0,
                         as_ptr<const int64_t>(targets), as_ptr<const float>(row_stats), as_ptr<const float>(grad),
                         as_ptr<const float>(entropy_grad), as_ptr<const float>(entropy),
                         LogitTransform{pre_scale, softcap, post_scale}, as_stream(stream));
      },
      py::arg("tile"), py::arg("dtype"), py::arg("rows"), py::arg("chunk"), py::arg("ld"), py::arg("v0"),
      py::arg("targets"), py::arg("row_stats"), py::arg("grad"), py::arg("entropy_grad") = 0,
      py::arg("entropy") = 0, py::arg("pre_scale") = 1.0, py::arg("softcap") = 0.0, py::arg("post_scale") = 1.0,
      py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
      "In place, the gradient w.r.t. y of a [rows, chunk] tile of GEMM outputs y (row stride ld, vocabulary "
      "[v0, v0 + chunk)), with z the transformed logits (see cuda_tile_fold_stats), logp = (z - m) - log_sum, "
      "p = exp(logp), (m, log_sum) = row_stats[r] (fp32 [rows, 2]: the row's max and log(sum_exp) over the whole "
      "vocabulary): dz = grad[r] * (onehot(v0 + j == targets[r]) - p) - entropy_grad[r] * p * (logp + entropy[r]) "
      "(the entropy term only when entropy_grad and entropy are given; 0 = none, both or neither), "
      "dy = dz * pre_scale * post_scale * (1 - tanh(pre_scale * y / softcap)^2) (softcap > 0) or "
      "dz * pre_scale * post_scale. Rows with grad == 0 and entropy_grad == 0 become zeros without being read. "
      "Enqueued on `stream`.");
}

}  // namespace dpo::cuda
