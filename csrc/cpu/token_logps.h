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
//
// With `stats` (not nullptr) the forward instead folds, in the same single pass over each row, the
// statistics of the per-token extras (entropy, mean logit, top-1, log sum p^2) and writes only
// `stats` ([S * T, kStatsFields] contiguous, accumulation type), the fields of the linear path's
// TileStats over the whole row (common/softmax_moments.h, store_row_stats); token_logps and
// row_stats are then not touched. A masked row gets the empty set's values (max -inf, sums 0,
// target_logit 0, both maxima -inf) without being read.

void token_logps_forward(const TokenRows& rows, void* token_logps, void* row_stats, void* stats, int num_threads);

// out[row, v] = grad[row] * (onehot(v == target) - exp((logit[row, v] - m) - log_sum)), zero rows
// for masked tokens. `out` has the logits' dtype and its own row strides (unit stride over V); it
// may be the logits themselves (in-place backward). row_stats (from the forward) and grad are
// contiguous in the accumulation type.
// With entropy_grad and entropy (both given, [S * T] contiguous, or both nullptr) the gradient of the
// entropy H joins: out[row, v] -= ge * p_v * (log p_v + H), ge = entropy_grad[row] (p log p = 0
// where p = 0); a row with grad == 0 and entropy_grad == 0 becomes zeros without being read.
void token_logps_backward(const TokenRows& rows, const void* row_stats, const void* grad, const void* entropy_grad,
                          const void* entropy, void* out, int64_t out_stride_s, int64_t out_stride_t,
                          int num_threads);

}  // namespace dpo::cpu
