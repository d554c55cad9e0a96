// Addressing of the logits path: which memory row holds the logits of token (s, t), and which
// vocabulary entry is its target. Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "dtypes.h"
#include "online_lse.h"

namespace dpo {

// Row (s, t) of the logits starts at `logits + s * stride_s + t * stride_t` elements and is unit
// stride over V (strided views such as logits[:, :-1] are read in place). Its target is
// targets[s, t] (contiguous [S, T], already aligned with the logits rows: Python applies `shift`
// to the small labels tensor, never to the logits); the row is masked when that target equals
// ignore_index.
struct TokenRows {
  const void* logits;
  DType dtype;
  int64_t S, T, V;
  int64_t stride_s, stride_t;
  const int64_t* targets;
  int64_t ignore_index;

  DPO_HOST_DEVICE int64_t num_rows() const { return S * T; }

  DPO_HOST_DEVICE int64_t element_offset(int64_t row) const {
    int64_t s = row / T;
    int64_t t = row - s * T;
    return s * stride_s + t * stride_t;
  }

  // kMasked for a masked row, kInvalid for a label outside [0, V), else the target index.
  static constexpr int64_t kMasked = -1;
  static constexpr int64_t kInvalid = -2;

  DPO_HOST_DEVICE int64_t target(int64_t row) const {
    int64_t y = targets[row];
    if (y == ignore_index) return kMasked;
    return (y < 0 || y >= V) ? kInvalid : y;
  }
};

}  // namespace dpo
