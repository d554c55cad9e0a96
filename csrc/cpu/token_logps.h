// C++ CPU kernels of the logits path: per-token log-probabilities (forward) and the logits
// gradient (backward). Rows run in parallel with OpenMP; each walks its vocabulary row once.
#pragma once

#include <cstdint>

#include "../common/token_rows.h"

namespace dpo::cpu {

// Writes token_logps[row] = logit[target] - logsumexp(row) and lse[row] for every row (0 for
// masked rows, which are not read). Outputs are contiguous [S * T] in the accumulation type:
// float64 for float64 logits, float32 otherwise. Throws std::invalid_argument on a label outside
// [0, V) that is not ignore_index.
void token_logps_forward(const TokenRows& rows, void* token_logps, void* lse, int num_threads);

// out[row, v] = grad[row] * (onehot(v == target) - exp(logit[row, v] - lse[row])), zero rows for
// masked tokens. `out` has the logits' dtype and its own row strides (unit stride over V); it may
// be the logits themselves (in-place backward). lse and grad are contiguous [S * T] in the
// accumulation type.
void token_logps_backward(const TokenRows& rows, const void* lse, const void* grad, void* out,
                          int64_t out_stride_s, int64_t out_stride_t, int num_threads);

}  // namespace dpo::cpu
