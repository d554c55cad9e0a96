#include "huge_pages.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dpo::cpu {

bool advise_huge_pages(uintptr_t ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096;
  constexpr size_t kMinBytes = size_t(8) << 20;  // below this the faults do not matter
  if (nbytes < kMinBytes) return false;
  const uintptr_t begin = (ptr + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (ptr + nbytes) & ~(kPage - 1);
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)ptr;
  (void)nbytes;
  return false;
#endif
}

}  // namespace dpo::cpu
