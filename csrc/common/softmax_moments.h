// Running softmax moments: the online log-sum-exp pair (max, sum of exp(z - max)) plus the two
// max-relative sums that the linear path's extras need, merged exactly like OnlineLse. Host and
// device (DPO_HOST_DEVICE), so CPU and CUDA code fold vocabulary chunks the same way.
//
// For a set of logits z with running max m:
//   sum      = sum_j exp(z_j - m)
//   centered = sum_j exp(z_j - m) * (z_j - m)      (a -inf logit contributes 0)
//   sum_sq   = sum_j exp(2 (z_j - m))
// which give, once every chunk is folded in,
//   lse                  = m + log(sum)
//   entropy              = -sum_j p_j log p_j = log(sum) - centered / sum   ( = lse - sum_j p_j z_j )
//   log sum_j p_j^2      = log(sum_sq) - 2 log(sum)
// Keeping the sums relative to m (rather than sum exp(z - m) * z) avoids cancellation when the
// logits are large.
#pragma once

#include <cmath>

#include "online_lse.h"

namespace dpo {

template <typename Acc>
struct SoftmaxMoments {
  Acc max;
  Acc sum;
  Acc centered;
  Acc sum_sq;

  // The empty set: max = -inf, all sums 0 (same convention as OnlineLse: sum == 0 means empty).
  DPO_HOST_DEVICE static SoftmaxMoments empty() { return {-INFINITY, Acc(0), Acc(0), Acc(0)}; }

  // Re-express the sums relative to new_max (>= max). Precondition: the set is not empty, so max
  // is finite and exp(-inf - -inf) never occurs.
  DPO_HOST_DEVICE void rescale_to(Acc new_max) {
    const Acc shift = max - new_max;  // <= 0
    const Acc r = exp_acc(shift);
    centered = r * (centered + shift * sum);
    sum_sq = sum_sq * (r * r);
    sum = sum * r;
    max = new_max;
  }

  // Merge another partial result into this one. A NaN sum falls through and propagates.
  DPO_HOST_DEVICE void merge(const SoftmaxMoments& other) {
    if (other.sum == Acc(0)) return;
    if (sum == Acc(0)) {
      *this = other;
      return;
    }
    SoftmaxMoments b = other;
    if (b.max > max) {
      rescale_to(b.max);
    } else if (max > b.max) {
      b.rescale_to(max);
    }
    sum = sum + b.sum;
    centered = centered + b.centered;
    sum_sq = sum_sq + b.sum_sq;
  }

  // log(sum(exp(z))); -inf for the empty set.
  DPO_HOST_DEVICE Acc lse() const { return sum == Acc(0) ? Acc(-INFINITY) : max + log_acc(sum); }
  DPO_HOST_DEVICE Acc entropy() const { return log_acc(sum) - centered / sum; }
  DPO_HOST_DEVICE Acc log_sum_sq_probs() const { return log_acc(sum_sq) - Acc(2) * log_acc(sum); }
};

// The logits path's per-row record of statistics with extras: the linear path's TileStats fields over
// the whole row, in the order of STATS_FIELDS (dpo_kernels/backends/tile_epilogue.py): max, sum_exp,
// target_logit, centered, sum_sq, sum_logits, max_before_target, max_after_target.
constexpr int kStatsFields = 8;

template <typename Acc>
DPO_HOST_DEVICE void store_row_stats(Acc* out, const SoftmaxMoments<Acc>& m, Acc target_logit, Acc sum_logits,
                                     Acc max_before_target, Acc max_after_target) {
  out[0] = m.max;
  out[1] = m.sum;
  out[2] = target_logit;
  out[3] = m.centered;
  out[4] = m.sum_sq;
  out[5] = sum_logits;
  out[6] = max_before_target;
  out[7] = max_after_target;
}

}  // namespace dpo
