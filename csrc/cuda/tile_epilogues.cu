// Kernels and host launchers of the linear path's tile epilogues (device functions in
// tile_epilogues.cuh, contracts in kernel_launchers.h).
//  - tile_fold_stats: rows mapped to 1-16 warps each like the logits forward; two variants, with
//    and without the extras' moments (the lean one is what a pass without extras runs).
//  - tile_logits_grad: grid x = tile row, y = span of the chunk, like the logits backward.
// Traffic: the fold reads the tile once and reads+writes a few fp32 per row; the gradient reads
// and writes the tile once. Nothing is materialised.
#include <cuda_runtime.h>

#include <string>

#include "kernel_launchers.h"
#include "launch_check.cuh"
#include "tile_epilogues.cuh"

namespace dpo::cuda {
namespace {

constexpr const char* kFoldKernel = "tile_fold_stats";
constexpr const char* kGradKernel = "tile_logits_grad";

template <typename T, bool kExtras>
__global__ void __launch_bounds__(kMaxRowThreads)
    tile_fold_stats_kernel(const T* tile, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                           const int64_t* __restrict__ targets, TileStats stats, int warps_per_row) {
  __shared__ RowPartial partials[kMaxRowWarps];
  fold_tile_rows<T, kExtras>(tile, rows, chunk, ld, v0, targets, stats, warps_per_row, partials);
}

template <typename T>
__global__ void __launch_bounds__(kSpanThreads)
    tile_logits_grad_kernel(T* tile, int64_t chunk, int64_t ld, int64_t v0, const int64_t* __restrict__ targets,
                            const float* __restrict__ row_stats, const float* __restrict__ grad,
                            int64_t vectors_per_span) {
  tile_row_grad_span<T>(tile, chunk, ld, v0, blockIdx.x, blockIdx.y, gridDim.y, vectors_per_span, targets, row_stats,
                        grad);
}

std::string tile_shapes(int64_t rows, int64_t chunk, int64_t ld, int64_t v0) {
  return "rows=" + std::to_string(rows) + ", chunk=" + std::to_string(chunk) + ", ld=" + std::to_string(ld) +
         ", v0=" + std::to_string(v0);
}

void check_tile_args(const char* kernel, int64_t rows, int64_t chunk, int64_t ld) {
  if (rows < 0 || chunk < 0 || (rows > 1 && ld < chunk)) {
    throw std::invalid_argument(std::string(kernel) + ": need rows >= 0, chunk >= 0 and ld >= chunk (" +
                                tile_shapes(rows, chunk, ld, 0) + ")");
  }
}

}  // namespace

void tile_fold_stats(const void* tile, DType dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                     const int64_t* targets, const TileStats& stats, void* stream) {
  dispatch_dtype(dtype, kFoldKernel, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_tile_args(kFoldKernel, rows, chunk, ld);
    if (!stats.max || !stats.sum_exp || !stats.target_logit) {
      throw std::invalid_argument(std::string(kFoldKernel) + ": max, sum_exp and target_logit are required");
    }
    if (rows == 0) return;
    check_element_aligned(tile, dtype, kFoldKernel, "tile");
    const auto shapes = [&] { return tile_shapes(rows, chunk, ld, v0); };
    const RowLaunch launch = choose_row_launch(rows, chunk, current_sm_count(kFoldKernel));
    check_grid(launch.blocks, 0x7fffffff, kFoldKernel, "row blocks", shapes);
    const auto* t = static_cast<const T*>(tile);
    const auto s = static_cast<cudaStream_t>(stream);
    const auto blocks = static_cast<unsigned>(launch.blocks);
    if (stats.tracks_extras()) {
      tile_fold_stats_kernel<T, true><<<blocks, launch.threads, 0, s>>>(t, rows, chunk, ld, v0, targets, stats,
                                                                         launch.warps_per_row);
    } else {
      tile_fold_stats_kernel<T, false><<<blocks, launch.threads, 0, s>>>(t, rows, chunk, ld, v0, targets, stats,
                                                                          launch.warps_per_row);
    }
    check_launch(kFoldKernel, dtype, shapes);
  });
}

void tile_logits_grad(void* tile, DType dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                      const int64_t* targets, const float* row_stats, const float* grad, void* stream) {
  dispatch_dtype(dtype, kGradKernel, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_tile_args(kGradKernel, rows, chunk, ld);
    if (rows == 0 || chunk == 0) return;
    check_element_aligned(tile, dtype, kGradKernel, "tile");
    const auto shapes = [&] { return tile_shapes(rows, chunk, ld, v0); };
    const SpanSplit split = split_row(chunk, ElementIo<T>::kPerVector, rows, current_sm_count(kGradKernel));
    check_grid(rows, 0x7fffffff, kGradKernel, "tile rows", shapes);
    check_grid(split.num_spans, 65535, kGradKernel, "chunk spans", shapes);
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(split.num_spans));
    tile_logits_grad_kernel<T><<<grid, kSpanThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(tile), chunk, ld, v0, targets, row_stats, grad, split.vectors_per_span);
    check_launch(kGradKernel, dtype, shapes);
  });
}

}  // namespace dpo::cuda
