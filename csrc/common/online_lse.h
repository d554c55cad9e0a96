// Online log-sum-exp: the running (max, sum of exp(x - max)) pair that every kernel folds a
// vocabulary chunk into. Shared by the CPU and CUDA code (host and device).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DPO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPO_HOST_DEVICE inline
#endif

namespace dpo {

DPO_HOST_DEVICE float exp_acc(float x) { return expf(x); }
DPO_HOST_DEVICE double exp_acc(double x) { return exp(x); }
DPO_HOST_DEVICE float log_acc(float x) { return logf(x); }
DPO_HOST_DEVICE double log_acc(double x) { return log(x); }

// Running statistics of a set of logits: max and sum(exp(x - max)). The empty set is
// (anything, 0); a set whose elements are all -inf contributes nothing and is also empty.
template <typename Acc>
struct OnlineLse {
  Acc max;
  Acc sum;

  DPO_HOST_DEVICE static OnlineLse empty() { return {-INFINITY, Acc(0)}; }

  // Merge another partial result into this one. Never evaluates exp(-inf - (-inf)).
  DPO_HOST_DEVICE void merge(Acc other_max, Acc other_sum) {
    if (other_sum == Acc(0)) return;  // empty partial; a NaN sum falls through and propagates
    if (sum == Acc(0)) {
      max = other_max;
      sum = other_sum;
    } else if (other_max > max) {
      sum = sum * exp_acc(max - other_max) + other_sum;
      max = other_max;
    } else {
      sum = sum + other_sum * exp_acc(other_max - max);
    }
  }

  DPO_HOST_DEVICE void merge(const OnlineLse& other) { merge(other.max, other.sum); }
};

}  // namespace dpo
