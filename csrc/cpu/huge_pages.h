// Paging advice for large fresh CPU buffers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dpo::cpu {

// Asks the kernel to back [ptr, ptr + nbytes) with transparent huge pages when it is first
// touched. A fresh gradient buffer of a few hundred MiB otherwise costs one page fault per 4 KiB,
// which on small machines takes longer than computing its contents. No effect (returns false)
// outside Linux, for small buffers, or when the kernel refuses.
bool advise_huge_pages(uintptr_t ptr, size_t nbytes);

}  // namespace dpo::cpu
