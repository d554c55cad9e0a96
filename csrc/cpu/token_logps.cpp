#include "token_logps.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "omp_threads.h"
#include "row_extras.h"
#include "vec_math.h"

namespace dpo::cpu {
namespace {

// Elements per chunk: the chunk's fp32 copy (16-bit inputs) stays in L1.
constexpr int64_t kChunk = 2048;

size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Float64: return 8;
    case DType::Float32: return 4;
    default: return 2;
  }
}

// Logits [v0, v0 + n) of a row as Acc values: the row itself when it already holds Acc, else
// converted into `buf`.
template <typename Acc>
const Acc* chunk_as_acc(const char* row, DType dtype, int64_t v0, int64_t n, Acc* buf) {
  if constexpr (sizeof(Acc) == 8) {
    return reinterpret_cast<const double*>(row) + v0;
  } else {
    if (dtype == DType::Float32) return reinterpret_cast<const float*>(row) + v0;
    chunk_to_float(reinterpret_cast<const uint16_t*>(row) + v0, dtype, n, buf);
    return buf;
  }
}

template <typename Acc>
Acc element_as_acc(const char* row, DType dtype, int64_t v) {
  switch (dtype) {
    case DType::Float64: return static_cast<Acc>(reinterpret_cast<const double*>(row)[v]);
    case DType::Float32: return static_cast<Acc>(reinterpret_cast<const float*>(row)[v]);
    case DType::BFloat16: return static_cast<Acc>(bf16_to_float(reinterpret_cast<const uint16_t*>(row)[v]));
    case DType::Float16: return static_cast<Acc>(fp16_to_float(reinterpret_cast<const uint16_t*>(row)[v]));
  }
  return Acc(0);
}

template <typename Acc>
void store_element(char* row, DType dtype, int64_t v, Acc value) {
  switch (dtype) {
    case DType::Float64: reinterpret_cast<double*>(row)[v] = static_cast<double>(value); break;
    case DType::Float32: reinterpret_cast<float*>(row)[v] = static_cast<float>(value); break;
    case DType::BFloat16: reinterpret_cast<uint16_t*>(row)[v] = float_to_bf16(static_cast<float>(value)); break;
    case DType::Float16: reinterpret_cast<uint16_t*>(row)[v] = float_to_fp16(static_cast<float>(value)); break;
  }
}

[[noreturn]] void throw_invalid_label(const TokenRows& rows, int64_t row) {
  int64_t s = row / rows.T, t = row % rows.T;
  throw std::invalid_argument("target of logits row [" + std::to_string(s) + ", " + std::to_string(t) + "] = " +
                              std::to_string(rows.targets[row]) + " is outside [0, " +
                              std::to_string(rows.V) + ") and is not ignore_index (" +
                              std::to_string(rows.ignore_index) + ")");
}

// Rows with an invalid label are skipped inside the parallel loop; the smallest such row is
// reported once the loop is done (exceptions must not leave an OpenMP region).
void record_invalid(std::atomic<int64_t>& first_invalid, int64_t row) {
  int64_t seen = first_invalid.load();
  while ((seen < 0 || row < seen) && !first_invalid.compare_exchange_weak(seen, row)) {
  }
}

template <typename Acc>
void store_stats(Acc* stats, int64_t row, const RowExtras<Acc>& e, Acc target_logit) {
  store_row_stats<Acc>(stats + kStatsFields * row, e.moments, target_logit, e.sum_logits, e.max_before, e.max_after);
}

// kExtras: one pass per row folds the softmax moments and the extras' statistics (RowExtras) and
// writes `stats`; otherwise the online log-sum-exp alone, writing token_logps and row_stats.
template <typename Acc, bool kExtras>
void forward_impl(const TokenRows& rows, Acc* token_logps, Acc* row_stats, Acc* stats, int num_threads) {
  const char* base = static_cast<const char*>(rows.logits);
  const size_t esize = element_size(rows.dtype);
  const int64_t num_rows = rows.num_rows();
  std::atomic<int64_t> first_invalid(-1);

#pragma omp parallel num_threads(resolve_threads(num_threads))
  {
    std::vector<Acc> buf(sizeof(Acc) == 4 ? kChunk : 0);
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < num_rows; ++row) {
      const int64_t target = rows.target(row);
      if (target < 0) {
        if (target == TokenRows::kInvalid) record_invalid(first_invalid, row);
        if constexpr (kExtras) {
          store_stats<Acc>(stats, row, RowExtras<Acc>::from(SoftmaxMoments<Acc>::empty()), Acc(0));
        } else {
          token_logps[row] = Acc(0);
          row_stats[2 * row] = Acc(0);
          row_stats[2 * row + 1] = Acc(0);
        }
        continue;
      }
      const char* row_ptr = base + rows.element_offset(row) * esize;
      OnlineLse<Acc> state = OnlineLse<Acc>::empty();
      RowExtras<Acc> extras = RowExtras<Acc>::from(SoftmaxMoments<Acc>::empty());
      for (int64_t v0 = 0; v0 < rows.V; v0 += kChunk) {
        const int64_t n = std::min(kChunk, rows.V - v0);
        const Acc* x = chunk_as_acc<Acc>(row_ptr, rows.dtype, v0, n, buf.data());
        const Acc m = chunk_max(x, n);
        if constexpr (kExtras) {
          extras.fold(x, n, m, target - v0, true);
        } else {
          if (m == -INFINITY) continue;  // an all -inf chunk adds nothing
          state.merge(m, chunk_sum_exp(x, n, m));
        }
      }
      const Acc target_logit = element_as_acc<Acc>(row_ptr, rows.dtype, target);
      if constexpr (kExtras) {
        store_stats<Acc>(stats, row, extras, target_logit);
      } else {
        // An all -inf row has max -inf and log_sum -inf: its log-prob is NaN, as log_softmax gives.
        const Acc log_sum = log_acc(state.sum);
        row_stats[2 * row] = state.max;
        row_stats[2 * row + 1] = log_sum;
        token_logps[row] = (target_logit - state.max) - log_sum;
      }
    }
  }
  if (first_invalid.load() >= 0) throw_invalid_label(rows, first_invalid.load());
}

// The identity transform of the linear path's chunk_logits_grad (vec_math.h).
inline TransformF identity_f() { return TransformF{TransformKind::Identity, 1.f, 1.f, 1.f, 1.f}; }
inline TransformD identity_d() { return TransformD{TransformKind::Identity, 1.0, 0.0, 1.0}; }

// kEntropy: the entropy term too (chunk_logits_grad, as the linear path's tile gradient), else the
// token log-prob's gradient alone (chunk_scaled_softmax, then the one-hot entry).
template <typename Acc, bool kEntropy>
void backward_impl(const TokenRows& rows, const Acc* row_stats, const Acc* grad, const Acc* entropy_grad,
                   const Acc* entropy, void* out, int64_t out_stride_s, int64_t out_stride_t, int num_threads) {
  const char* base = static_cast<const char*>(rows.logits);
  char* out_base = static_cast<char*>(out);
  const size_t esize = element_size(rows.dtype);
  const int64_t num_rows = rows.num_rows();
  const bool acc_typed = rows.dtype == DType::Float32 || rows.dtype == DType::Float64;
  std::atomic<int64_t> first_invalid(-1);
  [[maybe_unused]] const auto identity = [] {
    if constexpr (sizeof(Acc) == 8) {
      return identity_d();
    } else {
      return identity_f();
    }
  }();

#pragma omp parallel num_threads(resolve_threads(num_threads))
  {
    std::vector<Acc> in_buf(acc_typed ? 0 : kChunk), out_buf(acc_typed ? 0 : kChunk);
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < num_rows; ++row) {
      const int64_t s = row / rows.T, t = row - s * rows.T;
      char* out_row = out_base + (s * out_stride_s + t * out_stride_t) * esize;
      const int64_t target = rows.target(row);
      const Acc g = grad[row];
      const Acc ge = kEntropy ? entropy_grad[row] : Acc(0);
      if (target < 0 || (g == Acc(0) && ge == Acc(0))) {
        if (target == TokenRows::kInvalid) record_invalid(first_invalid, row);
        std::memset(out_row, 0, rows.V * esize);
        continue;
      }
      const char* row_ptr = base + rows.element_offset(row) * esize;
      const Acc row_max = row_stats[2 * row], log_sum = row_stats[2 * row + 1];
      if constexpr (kEntropy) {
        const Acc h = entropy[row];
        for (int64_t v0 = 0; v0 < rows.V; v0 += kChunk) {
          const int64_t n = std::min(kChunk, rows.V - v0);
          const Acc* x = chunk_as_acc<Acc>(row_ptr, rows.dtype, v0, n, in_buf.data());
          Acc* dst = acc_typed ? reinterpret_cast<Acc*>(out_row) + v0 : out_buf.data();
          chunk_logits_grad(x, n, identity, row_max, log_sum, g, ge, h, target - v0, dst);
          if constexpr (sizeof(Acc) == 4) {
            if (!acc_typed) chunk_from_float(out_buf.data(), rows.dtype, n, reinterpret_cast<uint16_t*>(out_row) + v0);
          }
        }
        continue;
      }
      // Read the target logit before the row is overwritten (out may alias the logits).
      const Acc target_logit = element_as_acc<Acc>(row_ptr, rows.dtype, target);
      for (int64_t v0 = 0; v0 < rows.V; v0 += kChunk) {
        const int64_t n = std::min(kChunk, rows.V - v0);
        const Acc* x = chunk_as_acc<Acc>(row_ptr, rows.dtype, v0, n, in_buf.data());
        if (acc_typed) {
          chunk_scaled_softmax(x, n, row_max, log_sum, -g, reinterpret_cast<Acc*>(out_row) + v0);
        } else if constexpr (sizeof(Acc) == 4) {
          chunk_scaled_softmax(x, n, row_max, log_sum, -g, out_buf.data());
          chunk_from_float(out_buf.data(), rows.dtype, n, reinterpret_cast<uint16_t*>(out_row) + v0);
        }
      }
      store_element<Acc>(out_row, rows.dtype, target, g * (Acc(1) - exp_acc((target_logit - row_max) - log_sum)));
    }
  }
  if (first_invalid.load() >= 0) throw_invalid_label(rows, first_invalid.load());
}

template <typename Acc>
void forward_typed(const TokenRows& rows, void* token_logps, void* row_stats, void* stats, int num_threads) {
  if (stats != nullptr) {
    forward_impl<Acc, true>(rows, nullptr, nullptr, static_cast<Acc*>(stats), num_threads);
  } else {
    forward_impl<Acc, false>(rows, static_cast<Acc*>(token_logps), static_cast<Acc*>(row_stats), nullptr,
                             num_threads);
  }
}

template <typename Acc>
void backward_typed(const TokenRows& rows, const void* row_stats, const void* grad, const void* entropy_grad,
                    const void* entropy, void* out, int64_t out_stride_s, int64_t out_stride_t, int num_threads) {
  const auto* rs = static_cast<const Acc*>(row_stats);
  const auto* g = static_cast<const Acc*>(grad);
  if (entropy_grad != nullptr) {
    backward_impl<Acc, true>(rows, rs, g, static_cast<const Acc*>(entropy_grad), static_cast<const Acc*>(entropy),
                             out, out_stride_s, out_stride_t, num_threads);
  } else {
    backward_impl<Acc, false>(rows, rs, g, nullptr, nullptr, out, out_stride_s, out_stride_t, num_threads);
  }
}

}  // namespace

void token_logps_forward(const TokenRows& rows, void* token_logps, void* row_stats, void* stats, int num_threads) {
  if (rows.dtype == DType::Float64) {
    forward_typed<double>(rows, token_logps, row_stats, stats, num_threads);
  } else {
    forward_typed<float>(rows, token_logps, row_stats, stats, num_threads);
  }
}

void token_logps_backward(const TokenRows& rows, const void* row_stats, const void* grad, const void* entropy_grad,
                          const void* entropy, void* out, int64_t out_stride_s, int64_t out_stride_t,
                          int num_threads) {
  if ((entropy_grad == nullptr) != (entropy == nullptr)) {
    throw std::invalid_argument("token_logps_backward: entropy_grad and entropy must be given together (or neither)");
  }
  if (rows.dtype == DType::Float64) {
    backward_typed<double>(rows, row_stats, grad, entropy_grad, entropy, out, out_stride_s, out_stride_t, num_threads);
  } else {
    backward_typed<float>(rows, row_stats, grad, entropy_grad, entropy, out, out_stride_s, out_stride_t, num_threads);
  }
}

}  // namespace dpo::cpu
