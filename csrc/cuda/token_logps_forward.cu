// Logits-path forward: per token row, the softmax statistics and the target log-prob in one pass
// over the row.
//
// Each row is streamed by 1-16 warps (row_stream.cuh: 16-byte ld.global.cs loads from the row's
// first 16-byte boundary, a scalar head and tail, fp32 online max / sum-exp in registers, warp
// shuffle then shared-memory combine); choose_row_launch maps a warp to a row below 4k elements
// and a 256-thread block to a row from 16k on. Lane 0 of the row reads the target logit after its
// share of the stream and writes token_logps[row] and the row's pair row_stats[2 row] = m (the row
// max, exact) and row_stats[2 row + 1] = log_sum = log(sum_j exp(x_j - m)) (a small number, so its
// fp32 rounding is ~1e-7 absolute, where an fp32 lse of logits near 1e4 would lose ~6e-4). Masked
// rows read nothing. Traffic: V * sizeof(T) bytes read per unmasked row, 12 bytes written per row;
// nothing is materialised.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "common/token_rows.h"
#include "kernel_launchers.h"
#include "launch_check.cuh"
#include "row_stream.cuh"

namespace dpo::cuda {
namespace {

constexpr const char* kKernel = "token_logps_forward";

template <typename T, bool kExtras>
__global__ void __launch_bounds__(kMaxRowThreads)
    token_logps_forward_kernel(TokenRows rows, int warps_per_row, float* __restrict__ token_logps,
                               float* __restrict__ row_stats, float* __restrict__ stats) {
  __shared__ RowPartial partials[kMaxRowWarps];
  const int row_threads = warps_per_row * kWarpSize;
  const int lane = threadIdx.x % row_threads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / row_threads) + threadIdx.x / row_threads;
  const bool in_range = row < rows.num_rows();
  const int64_t target = in_range ? rows.target(row) : TokenRows::kMasked;
  const T* row_ptr = static_cast<const T*>(rows.logits) + (in_range ? rows.element_offset(row) : 0);
  const int64_t n = target == TokenRows::kMasked ? 0 : rows.V;  // masked rows read nothing

  RowPartial p = stream_row<T, CachePolicy::kStreaming, kExtras>(row_ptr, n, lane, row_threads, target);
  // The target logit is read after the stream (its latency overlaps the combine) so that it holds
  // no register during the loop.
  float target_logit = 0.f;
  if (lane == 0 && target >= 0) target_logit = load_element<T, CachePolicy::kDefault>(row_ptr + target);
  p = combine_row<kExtras>(p, warps_per_row, partials);

  if constexpr (kExtras) {
    if (lane == 0 && in_range) {
      // masked: the empty set unread; a label outside [0, V): NaN target logit
      const float t = target >= 0 ? target_logit : (target == TokenRows::kMasked ? 0.f : NAN);
      store_row_stats<float>(stats + kStatsFields * row, p.m, t, p.sum_logits, p.max_before, p.max_after);
    }
  } else {
    if (lane == 0 && in_range) {
      float row_max = 0.f, row_log_sum = 0.f, row_logp = 0.f;
      if (target != TokenRows::kMasked) {
        // An all -inf row is the empty set (sum == 0): m = log_sum = -inf, and the log-prob below
        // comes out NaN, as log_softmax gives. Finished in double (a few operations per row):
        // log_sum and the log-prob each get one fp32 rounding.
        const bool empty = p.m.sum == 0.f;
        row_max = empty ? -INFINITY : p.m.max;
        const double log_sum64 = empty ? -INFINITY : log(static_cast<double>(p.m.sum));
        row_log_sum = static_cast<float>(log_sum64);
        row_logp = target >= 0 ? static_cast<float>((static_cast<double>(target_logit) - row_max) - log_sum64)
                               : NAN;  // NaN: label outside [0, V)
      }
      token_logps[row] = row_logp;
      row_stats[2 * row] = row_max;
      row_stats[2 * row + 1] = row_log_sum;
    }
  }
}

std::string shapes_of(const TokenRows& rows) {
  return "S=" + std::to_string(rows.S) + ", T=" + std::to_string(rows.T) + ", V=" + std::to_string(rows.V) +
         ", stride_s=" + std::to_string(rows.stride_s) + ", stride_t=" + std::to_string(rows.stride_t);
}

}  // namespace

void token_logps_forward(const TokenRows& rows, float* token_logps, float* row_stats, float* stats, void* stream) {
  dispatch_dtype(rows.dtype, kKernel, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t num_rows = rows.num_rows();
    if (num_rows == 0) return;
    check_element_aligned(rows.logits, rows.dtype, kKernel, "logits");
    const RowLaunch launch = choose_row_launch(num_rows, rows.V, current_sm_count(kKernel));
    const auto shapes = [&] { return shapes_of(rows); };
    check_grid(launch.blocks, 0x7fffffff, kKernel, "row blocks", shapes);
    const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
    const auto blocks = static_cast<unsigned>(launch.blocks);
    if (stats != nullptr) {
      launch_kernel(token_logps_forward_kernel<T, true>, blocks, launch.threads, 0, cuda_stream, rows,
                    launch.warps_per_row, nullptr, nullptr, stats);
    } else {
      launch_kernel(token_logps_forward_kernel<T, false>, blocks, launch.threads, 0, cuda_stream, rows,
                    launch.warps_per_row, token_logps, row_stats, nullptr);
    }
    check_launch(kKernel, rows.dtype, shapes);
  });
}

}  // namespace dpo::cuda
