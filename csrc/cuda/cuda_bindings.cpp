// pybind11 entry points of the CUDA kernels (compiled by the host compiler, only when CUDA is
// built). Pointers and the cudaStream_t handle arrive as Python ints; the launch functions are in
// the .cu files (kernel_launchers.h states each contract). Every entry point releases the GIL and
// returns once its kernel is enqueued; errors surface as ValueError (bad arguments, before any
// launch) or RuntimeError (a failed launch, naming the kernel, the dtype and the shapes).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/dtypes.h"
#include "common/token_rows.h"
#include "cuda_entry_points.h"
#include "entry_point_signatures.h"
#include "kernel_launchers.h"

namespace py = pybind11;

// Entry points are named cuda_<kernel>; the host emulation build binds them as cuda_emulated_<kernel>.
#ifndef DPO_CUDA_ENTRY_PREFIX
#define DPO_CUDA_ENTRY_PREFIX "cuda_"
#endif

namespace dpo::cuda {
namespace {

using entry_points::as_ptr;

void* as_stream(uintptr_t value) { return reinterpret_cast<void*>(value); }

}  // namespace

void register_entry_points(py::module_& m) {
  entry_points::def_token_logps_forward<uintptr_t>(
      m, DPO_CUDA_ENTRY_PREFIX "token_logps_forward",
      [](const TokenRows& rows, uintptr_t token_logps, uintptr_t row_stats, uintptr_t stats, uintptr_t stream) {
        token_logps_forward(rows, as_ptr<float>(token_logps), as_ptr<float>(row_stats), as_ptr<float>(stats),
                            as_stream(stream));
      },
      py::arg("stream"),
      "row_stats[s, t] = (m, log_sum) with m = max(logits[s, t, :]) and log_sum = log(sum(exp(logits[s, t, :] - m))) "
      "(fp32 [S, T, 2], interleaved), token_logps[s, t] = (logits[s, t, target] - m) - log_sum (fp32 [S, T]); 0, 0 "
      "and 0 for masked rows, -inf, -inf and NaN for a row of -inf logits. Enqueued on `stream`. logits: "
      "fp32/bf16/fp16 device pointer, row (s, t) at s * stride_s + t * stride_t elements; targets: int64 "
      "contiguous [S, T]. With stats (not 0): only the extras statistics, fp32 [S, T, 8] (kernel_launchers.h).");

  entry_points::def_token_logps_backward<uintptr_t>(
      m, DPO_CUDA_ENTRY_PREFIX "token_logps_backward",
      [](const TokenRows& rows, uintptr_t row_stats, uintptr_t grad, uintptr_t entropy_grad, uintptr_t entropy,
         uintptr_t out, int64_t out_stride_s, int64_t out_stride_t, uintptr_t stream) {
        token_logps_backward(rows, as_ptr<const float>(row_stats), as_ptr<const float>(grad),
                             as_ptr<const float>(entropy_grad), as_ptr<const float>(entropy), as_ptr<void>(out),
                             out_stride_s, out_stride_t, as_stream(stream));
      },
      py::arg("stream"),
      "out[s, t, v] = grad[s, t] * (onehot(v == target) - exp((logits[s, t, v] - m) - log_sum)) in the logits' dtype, "
      "(m, log_sum) = row_stats[s, t] as the forward wrote them (fp32 [S, T, 2]); zero rows for masked tokens and "
      "grad == 0. With entropy_grad and entropy (fp32 [S, T], or both 0) the entropy's gradient joins "
      "(kernel_launchers.h). Enqueued on `stream`; out may be the logits themselves.");

  entry_points::def_tile_fold_stats<uintptr_t>(
      m, DPO_CUDA_ENTRY_PREFIX "tile_fold_stats",
      [](const entry_points::Tile& tile, const entry_points::TileStatPtrs& p, const entry_points::Transform& t,
         uintptr_t stream) {
        const TileStats stats{as_ptr<float>(p.max),        as_ptr<float>(p.sum_exp),
                              as_ptr<float>(p.target_logit), as_ptr<float>(p.centered),
                              as_ptr<float>(p.sum_sq),     as_ptr<float>(p.sum_logits),
                              as_ptr<float>(p.max_before_target), as_ptr<float>(p.max_after_target)};
        tile_fold_stats(as_ptr<const void>(tile.data), tile.dtype, tile.rows, tile.chunk, tile.ld, tile.v0,
                        as_ptr<const int64_t>(tile.targets), stats, LogitTransform{t.pre_scale, t.softcap, t.post_scale},
                        as_stream(stream));
      },
      py::arg("stream") = 0,
      "Fold a [rows, chunk] tile of GEMM outputs y (fp32/bf16/fp16 device pointer; vocabulary [v0, v0 + chunk), "
      "row stride ld) into running per-row fp32 statistics of the logits z = post_scale * softcap * "
      "tanh(pre_scale * y / softcap) (softcap > 0) or post_scale * pre_scale * y (softcap == 0), computed in fp32: "
      "max, sum_exp, target_logit (required), and the optional extras centered, sum_sq, sum_logits, "
      "max_before_target, max_after_target (0 = not tracked). targets: int64 [rows], global vocabulary indices. "
      "Enqueued on `stream`. See csrc/cuda/kernel_launchers.h for initial values and how to finish token_logp, "
      "entropy, log_sum_sq_probs, mean_logits and is_top1.");

  entry_points::def_tile_logits_grad<uintptr_t>(
      m, DPO_CUDA_ENTRY_PREFIX "tile_logits_grad",
      [](const entry_points::Tile& tile, uintptr_t row_stats, uintptr_t grad, uintptr_t entropy_grad,
         uintptr_t entropy, const entry_points::Transform& t, uintptr_t stream) {
        tile_logits_grad(as_ptr<void>(tile.data), tile.dtype, tile.rows, tile.chunk, tile.ld, tile.v0,
                         as_ptr<const int64_t>(tile.targets), as_ptr<const float>(row_stats),
                         as_ptr<const float>(grad), as_ptr<const float>(entropy_grad), as_ptr<const float>(entropy),
                         LogitTransform{t.pre_scale, t.softcap, t.post_scale}, as_stream(stream));
      },
      py::arg("stream") = 0,
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
