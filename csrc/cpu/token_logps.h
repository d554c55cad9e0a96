// C++ CPU kernels of the logits path: per-token log-probabilities (forward) and the logits
// gradient (backward). Rows run in parallel with OpenMP; each walks its vocabulary row once.
#pragma once

#include <cstdint>

#include "../common/token_rows.h"

namespace dpo::cpu {

// For every row: row_stats[2 row] = m = max(row), row_stats[2 row + 1] = log(sum(exp(row - m)))
// and token_logps[row] = (logit[target] - m) - log_sum. The log-sum-exp is kept as this pair, never
// rounded to one number: with logits near 1e4 a single fp32 lse would be off by 1e-3. Masked rows
// are not read and get zeros. Outputs are contiguous ([S * T] and [S * T, 2]) in the accumulation
// type: float64 for float64 logits, float32 otherwise. Throws std::invalid_argument on a label
// outside [0, V) that is not ignore_index.
void token_logps_forward(const TokenRows& rows, void* token_logps, void* row_stats, int num_threads);

// out[row, v] = grad[row] * (onehot(v == target) - exp((logit[row, v] - m) - log_sum)), zero rows
// for masked tokens. `out` has the logits' dtype and its own row strides (unit stride over V); it
// may be the logits themselves (in-place backward). row_stats (from the forward) and grad are
// contiguous in the accumulation type.
void token_logps_backward(const TokenRows& rows, const void* row_stats, const void* grad, void* out,
                          int64_t out_stride_s, int64_t out_stride_t, int num_threads);

}  // namespace dpo::cpu
