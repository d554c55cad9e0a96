// Logits-path backward: dlogits[s, t, v] = g * (onehot(v == target) - p) with
// p = exp((logits[s, t, v] - m) - log_sum), (m, log_sum) the row's pair in row_stats (written by the
// forward; the difference to the row max is taken first, so no rounded log-sum-exp enters p).
//
// Grid: x = token row, y = vocabulary span (gradient_span.cuh: up to 64 KiB of logits per 256-thread
// block, 16-byte ld/st.global.cs when input and output rows share their 16-byte phase, scalars
// otherwise), so a few long rows still fill the GPU. One read and one write per element, by the
// same thread: `out` may be the logits themselves. Masked rows and rows with g == 0 are written as
// zeros without being read (nor are their row_stats). Traffic: V * sizeof(T) read (unmasked rows)
// + V * sizeof(T) written per row, plus 8 bytes of row_stats; nothing is materialised besides
// `out`, which the caller owns.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/token_rows.h"
#include "gradient_span.cuh"
#include "kernel_launchers.h"
#include "launch_check.cuh"
#include "tile_epilogues.cuh"

namespace dpo::cuda {
namespace {

constexpr const char* kKernel = "token_logps_backward";

// kEntropy: the entropy's gradient joins, through the tile gradient's element functor with the
// identity transform (tile_epilogues.cuh).
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kSpanThreads)
    token_logps_backward_kernel(TokenRows rows, const float* __restrict__ row_stats, const float* __restrict__ grad,
                                const float* __restrict__ entropy_grad, const float* __restrict__ entropy, T* out,
                                int64_t out_stride_s, int64_t out_stride_t, int64_t vectors_per_span) {
  const int64_t row = blockIdx.x;
  const int64_t s = row / rows.T;
  const int64_t t = row - s * rows.T;
  const T* in_row = static_cast<const T*>(rows.logits) + s * rows.stride_s + t * rows.stride_t;
  T* out_row = out + s * out_stride_s + t * out_stride_t;
  const int64_t target = rows.target(row);  // kInvalid (-2) hits no entry
  const float g = target == TokenRows::kMasked ? 0.f : grad[row];
  const float ge = kEntropy && target != TokenRows::kMasked ? entropy_grad[row] : 0.f;
  if (g == 0.f && ge == 0.f) {
    gradient_span<T, CachePolicy::kStreaming, true>(in_row, out_row, rows.V, blockIdx.y, gridDim.y, vectors_per_span,
                                                    -1, 0.f, 0.f, 0.f);
  } else if constexpr (kEntropy) {
    const TileGrad<IdentityTransform, true> op{IdentityTransform{}, row_stats[2 * row], row_stats[2 * row + 1], g, ge,
                                               entropy[row]};
    gradient_span_with<T, CachePolicy::kStreaming, false>(in_row, out_row, rows.V, blockIdx.y, gridDim.y,
                                                          vectors_per_span, target, op);
  } else {
    gradient_span<T, CachePolicy::kStreaming, false>(in_row, out_row, rows.V, blockIdx.y, gridDim.y,
                                                     vectors_per_span, target, row_stats[2 * row],
                                                     row_stats[2 * row + 1], g);
  }
}

std::string shapes_of(const TokenRows& rows, int64_t out_stride_s, int64_t out_stride_t) {
  return "S=" + std::to_string(rows.S) + ", T=" + std::to_string(rows.T) + ", V=" + std::to_string(rows.V) +
         ", stride_s=" + std::to_string(rows.stride_s) + ", stride_t=" + std::to_string(rows.stride_t) +
         ", out_stride_s=" + std::to_string(out_stride_s) + ", out_stride_t=" + std::to_string(out_stride_t);
}

}  // namespace

void token_logps_backward(const TokenRows& rows, const float* row_stats, const float* grad, const float* entropy_grad,
                          const float* entropy, void* out, int64_t out_stride_s, int64_t out_stride_t, void* stream) {
  if ((entropy_grad == nullptr) != (entropy == nullptr)) {
    throw std::invalid_argument(std::string(kKernel) + ": entropy_grad and entropy must be given together (or neither)");
  }
  dispatch_dtype(rows.dtype, kKernel, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t num_rows = rows.num_rows();
    if (num_rows == 0 || rows.V == 0) return;
    const auto shapes = [&] { return shapes_of(rows, out_stride_s, out_stride_t); };
    check_element_aligned(rows.logits, rows.dtype, kKernel, "logits");
    check_element_aligned(out, rows.dtype, kKernel, "out");
    const SpanSplit split = split_row(rows.V, ElementIo<T>::kPerVector, num_rows, current_sm_count(kKernel));
    check_grid(num_rows, 0x7fffffff, kKernel, "token rows", shapes);
    check_grid(split.num_spans, 65535, kKernel, "vocabulary spans", shapes);
    const dim3 grid(static_cast<unsigned>(num_rows), static_cast<unsigned>(split.num_spans));
    const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
    if (entropy_grad != nullptr) {
      launch_kernel(token_logps_backward_kernel<T, true>, grid, kSpanThreads, 0, cuda_stream, rows, row_stats, grad,
                    entropy_grad, entropy, static_cast<T*>(out), out_stride_s, out_stride_t, split.vectors_per_span);
    } else {
      launch_kernel(token_logps_backward_kernel<T, false>, grid, kSpanThreads, 0, cuda_stream, rows, row_stats, grad,
                    nullptr, nullptr, static_cast<T*>(out), out_stride_s, out_stride_t, split.vectors_per_span);
    }
    check_launch(kKernel, rows.dtype, shapes);
  });
}

}  // namespace dpo::cuda
