// One row's running softmax moments and the extras' plain statistics, folded piece by piece: the
// shared inner step of the linear path's tile fold (tile_epilogues.cpp) and of the logits path's
// forward with extras (token_logps.cpp). A piece is a run of logits already in the accumulation type
// (L1-resident); it is read by chunk_moments once, and around the target a second time for its
// maxima. Merging follows common/softmax_moments.h; nothing is allocated.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/softmax_moments.h"
#include "vec_math.h"

namespace dpo::cpu {

template <typename Acc>
struct RowExtras {
  SoftmaxMoments<Acc> moments;  // (max, sum exp, centered, sum_sq), relative to max
  Acc sum_logits;               // sum z
  Acc max_before;               // max z[j], j < target
  Acc max_after;                // max z[j], j > target

  static RowExtras from(const SoftmaxMoments<Acc>& m) { return {m, Acc(0), -INFINITY, -INFINITY}; }

  // Folds z[0, n), whose max is piece_max (chunk_max). k: the target's column relative to z (< 0:
  // the whole piece lies after the target, >= n: before it). top1: track max_before / max_after.
  void fold(const Acc* z, int64_t n, Acc piece_max, int64_t k, bool top1) {
    // An all -inf piece (max -inf) adds nothing; its sums taken relative to 0 are 0 (or NaN, which
    // then propagates through the merge).
    const Acc shift = piece_max == -INFINITY ? Acc(0) : piece_max;
    const ChunkMoments<Acc> cm = chunk_moments(z, n, shift);
    moments.merge(SoftmaxMoments<Acc>{piece_max, cm.sum, cm.centered, cm.sum_sq});
    sum_logits += cm.sum_logits;
    if (!top1) return;
    if (k >= n) {
      max_before = larger(max_before, piece_max);
    } else if (k < 0) {
      max_after = larger(max_after, piece_max);
    } else {
      max_before = larger(max_before, chunk_max(z, k));
      max_after = larger(max_after, chunk_max(z + k + 1, n - k - 1));
    }
  }

  static Acc larger(Acc a, Acc b) { return b > a ? b : a; }
};

}  // namespace dpo::cpu
