// The OpenMP team size of a CPU kernel: the caller's num_threads (torch.get_num_threads()), or
// OpenMP's default when it is 0 or less; 1 in a build without OpenMP.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dpo::cpu {

inline int resolve_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

}  // namespace dpo::cpu
