// Shared-memory race detection of the emulation. The emulated kernel sources are compiled with
// GCC's ThreadSanitizer instrumentation (-fsanitize=thread, compile only): every load and store
// they make calls a __tsan_readN / __tsan_writeN hook, defined here instead of by the TSan
// runtime (which is never linked). While a block runs, an access to static storage of this module
// is an access to a __shared__ variable (the emulation makes them static; kernels have no other
// static data), and is checked against per-byte shadow state (writer and reader, with the barrier
// interval in which they accessed the byte):
//   - a read of a byte no thread of the block has written (shared memory starts undefined);
//   - a read of a byte another thread wrote in the current interval (read after write);
//   - a write of a byte another thread read or wrote in the current interval.
// The first finding fails the launch, naming the block, the threads and the shared variable (from
// the module's symbol table). Everything else (global memory, stacks, thread-locals) is ignored.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/host_emulation/block_runtime.h"

namespace cuda_emulation::detail {
namespace {

struct Range {
  uintptr_t begin = 0;
  uintptr_t end = 0;
};

// The writable, non-RELRO part of the loaded segments of the module holding this file: its
// .data and .bss, where the emulated kernels' __shared__ variables live.
Range find_static_storage() {
  struct Search {
    uintptr_t probe;
    Range range;
  } search{reinterpret_cast<uintptr_t>(&find_static_storage), {}};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        auto* s = static_cast<Search*>(data);
        bool holds_probe = false;
        Range writable, relro;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
          const uintptr_t end = begin + ph.p_memsz;
          if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X) && s->probe >= begin && s->probe < end) holds_probe = true;
          if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W)) writable = {begin, end};
          if (ph.p_type == PT_GNU_RELRO) relro = {begin, end};
        }
        if (!holds_probe) return 0;
        if (relro.end > writable.begin && relro.end <= writable.end) writable.begin = relro.end;
        s->range = writable;
        return 1;
      },
      &search);
  return search.range;
}

const Range& static_storage() {
  static const Range range = find_static_storage();
  return range;
}

constexpr int kNobody = -1;
constexpr int kSeveral = -2;

struct ByteShadow {
  uint64_t write_interval = 0;
  uint64_t read_interval = 0;
  int writer = kNobody;
  int reader = kNobody;
};

thread_local std::unordered_map<uintptr_t, ByteShadow> g_shadow;
thread_local uint64_t g_interval = 1;

// "`name` (byte k)" from the module's ELF symbol table, else the address.
std::string describe(uintptr_t addr) {
  Dl_info dl{};
  if (dladdr(reinterpret_cast<void*>(&describe), &dl) && dl.dli_fname != nullptr) {
    std::ifstream file(dl.dli_fname, std::ios::binary);
    const std::vector<char> image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    const auto base = reinterpret_cast<uintptr_t>(dl.dli_fbase);
    if (image.size() >= sizeof(ElfW(Ehdr))) {
      const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(image.data());
      const auto* sections = reinterpret_cast<const ElfW(Shdr)*>(image.data() + eh->e_shoff);
      for (int i = 0; eh->e_shoff != 0 && i < eh->e_shnum; ++i) {
        if (sections[i].sh_type != SHT_SYMTAB) continue;
        const char* names = image.data() + sections[sections[i].sh_link].sh_offset;
        const auto* syms = reinterpret_cast<const ElfW(Sym)*>(image.data() + sections[i].sh_offset);
        const size_t count = sections[i].sh_size / sizeof(ElfW(Sym));
        for (size_t k = 0; k < count; ++k) {
          const uintptr_t begin = base + syms[k].st_value;
          if (ELF64_ST_TYPE(syms[k].st_info) != STT_OBJECT || addr < begin || addr >= begin + syms[k].st_size) continue;
          int status = 0;
          char* demangled = abi::__cxa_demangle(names + syms[k].st_name, nullptr, nullptr, &status);
          std::string name = status == 0 ? demangled : names + syms[k].st_name;
          std::free(demangled);
          return "`" + name + "` (byte " + std::to_string(addr - begin) + ")";
        }
      }
    }
  }
  char buf[32];
  snprintf(buf, sizeof(buf), "%#lx", static_cast<unsigned long>(addr));
  return std::string("memory at ") + buf;
}

std::string who(int thread) { return thread == kSeveral ? "other threads" : "thread " + std::to_string(thread); }

void check(void* p, size_t n, bool write) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  const Range& shared = static_storage();
  if (addr < shared.begin || addr >= shared.end) return;
  const int me = running_thread();
  const char* verb = write ? " writes " : " reads ";
  const std::string what = std::to_string(n) + " bytes of shared ";
  for (size_t i = 0; i < n; ++i) {
    ByteShadow& s = g_shadow[addr + i];
    if (write) {
      if (s.write_interval == g_interval && s.writer != me) {
        fail_block("thread " + std::to_string(me) + verb + what + describe(addr + i) + " that " + who(s.writer) +
                   " wrote since the last __syncthreads (write-write race)");
      }
      if (s.read_interval == g_interval && s.reader != me) {
        fail_block("thread " + std::to_string(me) + verb + what + describe(addr + i) + " that " + who(s.reader) +
                   " read since the last __syncthreads (write-after-read race)");
      }
      s.writer = me;
      s.write_interval = g_interval;
    } else {
      if (s.write_interval == 0) {
        fail_block("thread " + std::to_string(me) + verb + what + describe(addr + i) +
                   " that no thread of the block has written yet (uninitialised shared memory, or a missing __syncthreads"
                   " before this read)");
      }
      if (s.write_interval == g_interval && s.writer != me) {
        fail_block("thread " + std::to_string(me) + verb + what + describe(addr + i) + " that " + who(s.writer) +
                   " wrote since the last __syncthreads (read-after-write race: a missing __syncthreads?)");
      }
      s.reader = s.read_interval == g_interval && s.reader != me ? kSeveral : me;
      s.read_interval = g_interval;
    }
  }
}

}  // namespace

void shadow_reset() {
  g_shadow.clear();
  g_interval = 1;
}

void shadow_barrier() { ++g_interval; }

}  // namespace cuda_emulation::detail

// The hooks GCC's -fsanitize=thread instrumentation calls. Hidden: they serve this module only.
#define DPO_TSAN_HOOK extern "C" __attribute__((visibility("hidden"))) void
#define DPO_TSAN_ACCESS(n)                                                                                       \
  DPO_TSAN_HOOK __tsan_read##n(void* p) {                                                                       \
    if (cuda_emulation::detail::g_in_block) cuda_emulation::detail::check(p, n, false);                         \
  }                                                                                                              \
  DPO_TSAN_HOOK __tsan_write##n(void* p) {                                                                      \
    if (cuda_emulation::detail::g_in_block) cuda_emulation::detail::check(p, n, true);                          \
  }                                                                                                              \
  DPO_TSAN_HOOK __tsan_unaligned_read##n(void* p) { __tsan_read##n(p); }                                        \
  DPO_TSAN_HOOK __tsan_unaligned_write##n(void* p) { __tsan_write##n(p); }                                      \
  DPO_TSAN_HOOK __tsan_volatile_read##n(void* p) { __tsan_read##n(p); }                                         \
  DPO_TSAN_HOOK __tsan_volatile_write##n(void* p) { __tsan_write##n(p); }

DPO_TSAN_ACCESS(1)
DPO_TSAN_ACCESS(2)
DPO_TSAN_ACCESS(4)
DPO_TSAN_ACCESS(8)
DPO_TSAN_ACCESS(16)

DPO_TSAN_HOOK __tsan_read_range(void* p, unsigned long n) {
  if (cuda_emulation::detail::g_in_block) cuda_emulation::detail::check(p, n, false);
}
DPO_TSAN_HOOK __tsan_write_range(void* p, unsigned long n) {
  if (cuda_emulation::detail::g_in_block) cuda_emulation::detail::check(p, n, true);
}
DPO_TSAN_HOOK __tsan_vptr_read(void**) {}
DPO_TSAN_HOOK __tsan_vptr_update(void**, void*) {}
DPO_TSAN_HOOK __tsan_init() {}
DPO_TSAN_HOOK __tsan_func_entry(void*) {}
DPO_TSAN_HOOK __tsan_func_exit() {}
