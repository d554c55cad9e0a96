#include "tile_epilogues.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/online_lse.h"
#include "../common/softmax_moments.h"
#include "omp_threads.h"
#include "row_extras.h"
#include "vec_math.h"

namespace dpo::cpu {
namespace {

// Elements per piece of a tile row: the piece's fp32 copy (16-bit tiles, or a transformed fp32
// tile) stays in L1 between the passes over it.
constexpr int64_t kPiece = 2048;

// Tiles smaller than this run on the calling thread (starting a thread team costs more).
constexpr int64_t kMinParallelElements = int64_t(1) << 15;

size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Float64: return 8;
    case DType::Float32: return 4;
    default: return 2;
  }
}

bool run_parallel(const TileView& tile) { return tile.rows > 1 && tile.rows * tile.chunk >= kMinParallelElements; }

[[noreturn]] void invalid(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string(fn) + ": " + what);
}

void check_common(const char* fn, const TileView& tile, const LogitTransformParams& transform) {
  const int code = static_cast<int>(tile.dtype);
  if (code < 0 || code > static_cast<int>(DType::Float64)) invalid(fn, "unknown dtype code " + std::to_string(code));
  if (tile.rows < 0 || tile.chunk < 0) {
    invalid(fn, "rows and chunk must be >= 0, got rows=" + std::to_string(tile.rows) +
                    " chunk=" + std::to_string(tile.chunk));
  }
  if (tile.rows > 1 && tile.ld < tile.chunk) {
    invalid(fn, "row stride ld=" + std::to_string(tile.ld) + " is smaller than chunk=" + std::to_string(tile.chunk));
  }
  if (tile.v0 < 0) invalid(fn, "v0 must be >= 0, got " + std::to_string(tile.v0));
  if (tile.rows > 0 && tile.chunk > 0 && tile.data == nullptr) invalid(fn, "tile pointer is null");
  if (tile.rows > 0 && tile.targets == nullptr) invalid(fn, "targets pointer is null");
  if (!(transform.softcap >= 0.0)) invalid(fn, "softcap must be >= 0 (0: none), got " + std::to_string(transform.softcap));
}

// The transform in the accumulation type's form (vec_math.h).
TransformKind transform_kind(const LogitTransformParams& p) {
  if (p.softcap > 0.0) return TransformKind::Softcap;
  return p.pre_scale == 1.0 && p.post_scale == 1.0 ? TransformKind::Identity : TransformKind::Scale;
}

TransformF transform_f(const LogitTransformParams& p) {
  TransformF t{transform_kind(p), static_cast<float>(p.pre_scale * p.post_scale), 1.0f, 1.0f,
               static_cast<float>(p.pre_scale * p.post_scale)};
  if (t.kind == TransformKind::Softcap) {
    t.cap_in = static_cast<float>(p.pre_scale / p.softcap);
    t.cap_out = static_cast<float>(p.softcap * p.post_scale);
  } else if (t.kind == TransformKind::Scale && t.scale == 1.0f) {
    t.kind = TransformKind::Identity;  // e.g. pre_scale = 2, post_scale = 0.5
  }
  return t;
}

TransformD transform_d(const LogitTransformParams& p) {
  return TransformD{transform_kind(p), p.pre_scale, p.softcap, p.post_scale};
}

template <typename Acc>
using TransformFor = std::conditional_t<sizeof(Acc) == 8, TransformD, TransformF>;

template <typename Acc>
TransformFor<Acc> make_transform(const LogitTransformParams& p) {
  if constexpr (sizeof(Acc) == 8) {
    return transform_d(p);
  } else {
    return transform_f(p);
  }
}

// z over elements [p0, p0 + n) of a tile row, as Acc: the row itself for an Acc-typed row and the
// identity transform, else converted and / or transformed into `buf`.
template <typename Acc>
const Acc* piece_logits(const char* row, DType dtype, int64_t p0, int64_t n, const TransformFor<Acc>& t, Acc* buf) {
  const bool identity = t.kind == TransformKind::Identity;
  if constexpr (sizeof(Acc) == 8) {
    const double* y = reinterpret_cast<const double*>(row) + p0;
    if (identity) return y;
    chunk_transform(y, n, t, buf);
  } else {
    if (dtype == DType::Float32) {
      const float* y = reinterpret_cast<const float*>(row) + p0;
      if (identity) return y;
      chunk_transform(y, n, t, buf);
    } else {
      chunk_to_float(reinterpret_cast<const uint16_t*>(row) + p0, dtype, n, buf);
      if (!identity) chunk_transform(buf, n, t, buf);
    }
  }
  return buf;
}

// Where row r's target falls in the tile: its column when the tile holds it, else -1 (below v0:
// the whole tile is "after" it) or `chunk` (at or above v0 + chunk: the whole tile is "before").
inline int64_t target_column(const TileView& tile, int64_t r) {
  const int64_t target = tile.targets[r];
  if (target < tile.v0) return -1;
  return target - tile.v0 < tile.chunk ? target - tile.v0 : tile.chunk;  // no overflow: v0 >= 0
}

template <typename Acc>
inline Acc max_of(Acc a, Acc b) {
  return b > a ? b : a;
}

template <typename Acc, bool kExtras>
void fold_impl(const TileView& tile, const TileStatsPtrs& st, const LogitTransformParams& params, int num_threads) {
  const TransformFor<Acc> transform = make_transform<Acc>(params);
  const char* base = static_cast<const char*>(tile.data);
  const size_t esize = element_size(tile.dtype);
  Acc* const max = static_cast<Acc*>(st.max);
  Acc* const sum_exp = static_cast<Acc*>(st.sum_exp);
  Acc* const target_logit = static_cast<Acc*>(st.target_logit);
  Acc* const centered = static_cast<Acc*>(st.centered);
  Acc* const sum_sq = static_cast<Acc*>(st.sum_sq);
  Acc* const sum_logits = static_cast<Acc*>(st.sum_logits);
  Acc* const max_before = static_cast<Acc*>(st.max_before_target);
  Acc* const max_after = static_cast<Acc*>(st.max_after_target);
  const bool top1 = max_before != nullptr || max_after != nullptr;

#pragma omp parallel num_threads(resolve_threads(num_threads)) if (run_parallel(tile))
  {
    alignas(64) Acc buf[kPiece];
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < tile.rows; ++r) {
      const char* row = base + static_cast<size_t>(r * tile.ld) * esize;
      const int64_t tcol = target_column(tile, r);
      OnlineLse<Acc> lse{max[r], sum_exp[r]};
      RowExtras<Acc> row_extras = RowExtras<Acc>::from(
          {max[r], sum_exp[r], centered ? centered[r] : Acc(0), sum_sq ? sum_sq[r] : Acc(0)});
      for (int64_t p0 = 0; p0 < tile.chunk; p0 += kPiece) {
        const int64_t n = std::min(kPiece, tile.chunk - p0);
        const Acc* z = piece_logits<Acc>(row, tile.dtype, p0, n, transform, buf);
        const Acc piece_max = chunk_max(z, n);
        const int64_t k = tcol - p0;  // the target's column in this piece
        if (k >= 0 && k < n) target_logit[r] = z[k];
        if constexpr (kExtras) {
          row_extras.fold(z, n, piece_max, k, top1);
        } else {
          // An all -inf piece adds nothing (a NaN sum propagates through the merge).
          lse.merge(piece_max, chunk_sum_exp(z, n, piece_max == -INFINITY ? Acc(0) : piece_max));
        }
      }
      if constexpr (kExtras) {
        const SoftmaxMoments<Acc>& moments = row_extras.moments;
        max[r] = moments.max;
        sum_exp[r] = moments.sum;
        if (centered) centered[r] = moments.centered;
        if (sum_sq) sum_sq[r] = moments.sum_sq;
        if (sum_logits) sum_logits[r] += row_extras.sum_logits;
        if (max_before) max_before[r] = max_of(max_before[r], row_extras.max_before);
        if (max_after) max_after[r] = max_of(max_after[r], row_extras.max_after);
      } else {
        max[r] = lse.max;
        sum_exp[r] = lse.sum;
      }
    }
  }
}

template <typename Acc>
void grad_impl(const TileView& tile, const Acc* row_stats, const Acc* grad, const Acc* entropy_grad,
               const Acc* entropy, const LogitTransformParams& params, int num_threads) {
  const TransformFor<Acc> transform = make_transform<Acc>(params);
  char* base = static_cast<char*>(tile.data);
  const size_t esize = element_size(tile.dtype);

#pragma omp parallel num_threads(resolve_threads(num_threads)) if (run_parallel(tile))
  {
    alignas(64) float buf[sizeof(Acc) == 4 ? kPiece : 1];
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < tile.rows; ++r) {
      char* row = base + static_cast<size_t>(r * tile.ld) * esize;
      const Acc g = grad[r];
      const Acc ge = entropy_grad ? entropy_grad[r] : Acc(0);
      if (g == Acc(0) && ge == Acc(0)) {
        std::memset(row, 0, static_cast<size_t>(tile.chunk) * esize);
        continue;
      }
      const Acc h = entropy ? entropy[r] : Acc(0);
      const Acc m = row_stats[2 * r], log_sum = row_stats[2 * r + 1];
      const int64_t tcol = target_column(tile, r);
      for (int64_t p0 = 0; p0 < tile.chunk; p0 += kPiece) {
        const int64_t n = std::min(kPiece, tile.chunk - p0);
        const int64_t k = tcol - p0;  // outside [0, n): no onehot term in this piece
        if constexpr (sizeof(Acc) == 8) {
          double* y = reinterpret_cast<double*>(row) + p0;
          chunk_logits_grad(y, n, transform, m, log_sum, g, ge, h, k, y);
        } else if (tile.dtype == DType::Float32) {
          float* y = reinterpret_cast<float*>(row) + p0;
          chunk_logits_grad(y, n, transform, m, log_sum, g, ge, h, k, y);
        } else {
          uint16_t* y = reinterpret_cast<uint16_t*>(row) + p0;
          chunk_to_float(y, tile.dtype, n, buf);
          chunk_logits_grad(buf, n, transform, m, log_sum, g, ge, h, k, buf);
          chunk_from_float(buf, tile.dtype, n, y);
        }
      }
    }
  }
}

}  // namespace

void tile_fold_stats(const TileView& tile, const TileStatsPtrs& stats, const LogitTransformParams& transform,
                     int num_threads) {
  constexpr const char* fn = "tile_fold_stats";
  check_common(fn, tile, transform);
  if (tile.rows > 0 && (stats.max == nullptr || stats.sum_exp == nullptr || stats.target_logit == nullptr)) {
    invalid(fn, "max, sum_exp and target_logit are required");
  }
  if (tile.rows == 0 || tile.chunk == 0) return;
  const bool extras = stats.centered || stats.sum_sq || stats.sum_logits || stats.max_before_target ||
                      stats.max_after_target;
  if (tile.dtype == DType::Float64) {
    if (extras) {
      fold_impl<double, true>(tile, stats, transform, num_threads);
    } else {
      fold_impl<double, false>(tile, stats, transform, num_threads);
    }
  } else {
    if (extras) {
      fold_impl<float, true>(tile, stats, transform, num_threads);
    } else {
      fold_impl<float, false>(tile, stats, transform, num_threads);
    }
  }
}

void tile_logits_grad(const TileView& tile, const void* row_stats, const void* grad, const void* entropy_grad,
                      const void* entropy, const LogitTransformParams& transform, int num_threads) {
  constexpr const char* fn = "tile_logits_grad";
  check_common(fn, tile, transform);
  if (tile.rows > 0 && (row_stats == nullptr || grad == nullptr)) invalid(fn, "row_stats and grad are required");
  if ((entropy_grad == nullptr) != (entropy == nullptr)) {
    invalid(fn, "entropy_grad and entropy must be given together (or neither)");
  }
  if (tile.rows == 0 || tile.chunk == 0) return;
  if (tile.dtype == DType::Float64) {
    grad_impl<double>(tile, static_cast<const double*>(row_stats), static_cast<const double*>(grad),
                      static_cast<const double*>(entropy_grad), static_cast<const double*>(entropy), transform,
                      num_threads);
  } else {
    grad_impl<float>(tile, static_cast<const float*>(row_stats), static_cast<const float*>(grad),
                     static_cast<const float*>(entropy_grad), static_cast<const float*>(entropy), transform,
                     num_threads);
  }
}

}  // namespace dpo::cpu
