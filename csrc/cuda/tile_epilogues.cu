// Kernels and host launchers of the linear path's tile epilogues (device functions in
// tile_epilogues.cuh, contracts in kernel_launchers.h).
//  - tile_fold_stats: rows mapped to 1-16 warps each like the logits forward; variants with and
//    without the extras' moments (the lean one is what a pass without extras runs), times the
//    three transforms (identity: no per-element work; scale: 2 fp32 operations; softcap: tanh, two
//    more MUFU operations an element).
//  - tile_logits_grad: grid x = tile row, y = span of the chunk, like the logits backward;
//    variants with and without the entropy term, times the three transforms.
// Traffic: the fold reads the tile once and reads+writes a few fp32 per row; the gradient reads
// and writes the tile once. Nothing is materialised.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "kernel_launchers.h"
#include "launch_check.cuh"
#include "logit_transform.cuh"
#include "tile_epilogues.cuh"

namespace dpo::cuda {
namespace {

constexpr const char* kFoldKernel = "tile_fold_stats";
constexpr const char* kGradKernel = "tile_logits_grad";

template <typename T, bool kExtras, typename Transform>
__global__ void __launch_bounds__(kMaxRowThreads)
    tile_fold_stats_kernel(const T* tile, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                           const int64_t* __restrict__ targets, TileStats stats, int warps_per_row,
                           Transform transform) {
  __shared__ RowPartial partials[kMaxRowWarps];
  fold_tile_rows<T, kExtras>(tile, rows, chunk, ld, v0, targets, stats, warps_per_row, partials, transform);
}

template <typename T, bool kEntropy, typename Transform>
__global__ void __launch_bounds__(kSpanThreads)
    tile_logits_grad_kernel(T* tile, int64_t chunk, int64_t ld, int64_t v0, const int64_t* __restrict__ targets,
                            const float* __restrict__ row_stats, const float* __restrict__ grad,
                            const float* __restrict__ entropy_grad, const float* __restrict__ entropy,
                            int64_t vectors_per_span, Transform transform) {
  tile_row_grad_span<T, kEntropy>(tile, chunk, ld, v0, blockIdx.x, blockIdx.y, gridDim.y, vectors_per_span, targets,
                                  row_stats, grad, entropy_grad, entropy, transform);
}

std::string tile_shapes(int64_t rows, int64_t chunk, int64_t ld, int64_t v0) {
  return "rows=" + std::to_string(rows) + ", chunk=" + std::to_string(chunk) + ", ld=" + std::to_string(ld) +
         ", v0=" + std::to_string(v0);
}

[[noreturn]] void invalid(const char* kernel, const std::string& what) {
  throw std::invalid_argument(std::string(kernel) + ": " + what);
}

void check_tile_shape(const char* kernel, int64_t rows, int64_t chunk, int64_t ld, int64_t v0) {
  if (rows < 0 || chunk < 0 || (rows > 1 && ld < chunk)) {
    invalid(kernel, "need rows >= 0, chunk >= 0 and ld >= chunk (" + tile_shapes(rows, chunk, ld, v0) + ")");
  }
  if (v0 < 0) invalid(kernel, "v0 must be >= 0 (" + tile_shapes(rows, chunk, ld, v0) + ")");
}

void check_tile_pointers(const char* kernel, const void* tile, const int64_t* targets, int64_t rows, int64_t chunk) {
  if (rows > 0 && chunk > 0 && tile == nullptr) invalid(kernel, "tile pointer is null");
  if (rows > 0 && chunk > 0 && targets == nullptr) invalid(kernel, "targets pointer is null");
}

std::string number(double value) {
  char buf[32];
  snprintf(buf, sizeof(buf), "%.17g", value);
  return buf;
}

// An fp32 factor of the transform; throws when it is not finite in fp32.
float fp32_factor(const char* kernel, double value, const char* what) {
  const auto f = static_cast<float>(value);
  if (!std::isfinite(f)) invalid(kernel, std::string(what) + " = " + number(value) + " is not finite in float32");
  return f;
}

// Calls f(transform) with the device form of `t`: IdentityTransform, ScaleTransform or
// SoftcapTransform (logit_transform.cuh). Throws when an fp32 factor is not finite.
template <typename F>
void with_transform(const char* kernel, const LogitTransform& t, F&& f) {
  const double scale = t.pre_scale * t.post_scale;
  const float scale_hi = fp32_factor(kernel, scale, "pre_scale * post_scale");
  if (t.softcap > 0.0) {
    f(SoftcapTransform{fp32_factor(kernel, t.pre_scale / t.softcap, "pre_scale / softcap"),
                       fp32_factor(kernel, t.softcap * t.post_scale, "softcap * post_scale"), scale_hi});
    return;
  }
  const auto scale_lo = static_cast<float>(scale - static_cast<double>(scale_hi));
  if (scale_hi == 1.f && scale_lo == 0.f) {
    f(IdentityTransform{});  // pre_scale = post_scale = 1, or e.g. pre_scale = 2, post_scale = 0.5
  } else {
    f(ScaleTransform{scale_hi, scale_lo});
  }
}

// Throws std::invalid_argument (naming the parameter) for a transform no kernel takes: non-finite
// scales, a negative or non-finite softcap, fp32 factors that overflow. Before any CUDA call.
void check_transform(const char* kernel, const LogitTransform& t) {
  if (!std::isfinite(t.pre_scale)) invalid(kernel, "pre_scale must be finite, got " + number(t.pre_scale));
  if (!std::isfinite(t.post_scale)) invalid(kernel, "post_scale must be finite, got " + number(t.post_scale));
  if (!(t.softcap >= 0.0) || !std::isfinite(t.softcap)) {
    invalid(kernel, "softcap must be finite and >= 0 (0: none), got " + number(t.softcap));
  }
  with_transform(kernel, t, [](auto) {});  // the fp32 factors
}

}  // namespace

void tile_fold_stats(const void* tile, DType dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                     const int64_t* targets, const TileStats& stats, const LogitTransform& transform, void* stream) {
  dispatch_dtype(dtype, kFoldKernel, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_tile_shape(kFoldKernel, rows, chunk, ld, v0);
    if (rows > 0 && chunk > 0) {
      if (!stats.max) invalid(kFoldKernel, "max pointer is null (max, sum_exp and target_logit are required)");
      if (!stats.sum_exp) invalid(kFoldKernel, "sum_exp pointer is null (max, sum_exp and target_logit are required)");
      if (!stats.target_logit) {
        invalid(kFoldKernel, "target_logit pointer is null (max, sum_exp and target_logit are required)");
      }
    }
    check_tile_pointers(kFoldKernel, tile, targets, rows, chunk);
    check_transform(kFoldKernel, transform);
    if (rows == 0 || chunk == 0) return;  // nothing to fold: the statistics stay as they are
    check_element_aligned(tile, dtype, kFoldKernel, "tile");
    const auto shapes = [&] { return tile_shapes(rows, chunk, ld, v0); };
    const RowLaunch launch = choose_row_launch(rows, chunk, current_sm_count(kFoldKernel));
    check_grid(launch.blocks, 0x7fffffff, kFoldKernel, "row blocks", shapes);
    const auto* t = static_cast<const T*>(tile);
    const auto s = static_cast<cudaStream_t>(stream);
    const auto blocks = static_cast<unsigned>(launch.blocks);
    with_transform(kFoldKernel, transform, [&](auto tf) {
      using Transform = decltype(tf);
      if (stats.tracks_extras()) {
        launch_kernel(tile_fold_stats_kernel<T, true, Transform>, blocks, launch.threads, 0, s, t, rows, chunk, ld,
                      v0, targets, stats, launch.warps_per_row, tf);
      } else {
        launch_kernel(tile_fold_stats_kernel<T, false, Transform>, blocks, launch.threads, 0, s, t, rows, chunk, ld,
                      v0, targets, stats, launch.warps_per_row, tf);
      }
    });
    check_launch(kFoldKernel, dtype, shapes);
  });
}

void tile_logits_grad(void* tile, DType dtype, int64_t rows, int64_t chunk, int64_t ld, int64_t v0,
                      const int64_t* targets, const float* row_stats, const float* grad, const float* entropy_grad,
                      const float* entropy, const LogitTransform& transform, void* stream) {
  dispatch_dtype(dtype, kGradKernel, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_tile_shape(kGradKernel, rows, chunk, ld, v0);
    check_tile_pointers(kGradKernel, tile, targets, rows, chunk);
    if (rows > 0 && chunk > 0) {
      if (!row_stats) invalid(kGradKernel, "row_stats pointer is null");
      if (!grad) invalid(kGradKernel, "grad pointer is null");
    }
    if ((entropy_grad == nullptr) != (entropy == nullptr)) {
      invalid(kGradKernel, std::string("entropy_grad and entropy must be given together (") +
                               (entropy_grad ? "entropy" : "entropy_grad") + " pointer is null)");
    }
    check_transform(kGradKernel, transform);
    if (rows == 0 || chunk == 0) return;
    check_element_aligned(tile, dtype, kGradKernel, "tile");
    const auto shapes = [&] { return tile_shapes(rows, chunk, ld, v0); };
    const SpanSplit split = split_row(chunk, ElementIo<T>::kPerVector, rows, current_sm_count(kGradKernel));
    check_grid(rows, 0x7fffffff, kGradKernel, "tile rows", shapes);
    check_grid(split.num_spans, 65535, kGradKernel, "chunk spans", shapes);
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(split.num_spans));
    const auto s = static_cast<cudaStream_t>(stream);
    auto* t = static_cast<T*>(tile);
    with_transform(kGradKernel, transform, [&](auto tf) {
      using Transform = decltype(tf);
      if (entropy_grad != nullptr) {
        launch_kernel(tile_logits_grad_kernel<T, true, Transform>, grid, kSpanThreads, 0, s, t, chunk, ld, v0,
                      targets, row_stats, grad, entropy_grad, entropy, split.vectors_per_span, tf);
      } else {
        launch_kernel(tile_logits_grad_kernel<T, false, Transform>, grid, kSpanThreads, 0, s, t, chunk, ld, v0,
                      targets, row_stats, grad, nullptr, nullptr, split.vectors_per_span, tf);
      }
    });
    check_launch(kGradKernel, dtype, shapes);
  });
}

}  // namespace dpo::cuda
