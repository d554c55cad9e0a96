// The emulation's runtime: a launch runs its blocks one after another on the calling thread; a
// block's threads are ucontext fibers that run until they reach __syncthreads, a warp intrinsic
// or their end, and then hand over to the next runnable fiber in index order. A barrier releases
// when every thread of the block has arrived, a warp intrinsic when every lane of its mask has.
// When no fiber can run and some have not finished, the block has diverged: reported as the
// launch's error, like a race (race_detector.cpp). Launches are serialised process-wide.
#include <sys/mman.h>
#include <ucontext.h>

#include <mutex>
#include <vector>

#include "cuda/host_emulation/block_runtime.h"
#include "cuda/host_emulation/cuda_emulation.h"

namespace cuda_emulation {

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace {

constexpr int kMaxBlockThreads = 1024;
constexpr int kWarpLanes = 32;
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kGuardBytes = 4096;

enum class State { kRunnable, kAtBarrier, kAtWarp, kDone };

struct Fiber {
  ucontext_t context;
  uint3 index;
  State state;
};

struct Warp {
  uint32_t present = 0;  // lanes that exist (a partial last warp has fewer)
  uint32_t mask = 0;     // the mask of the intrinsic being gathered
  uint32_t arrived = 0;
  int phase = 0;         // slots alternate, so a lane may deposit for the next exchange early
  uint32_t slots[2][kWarpLanes];
};

struct Block {
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  int size = 0;
  int live = 0;
  int at_barrier = 0;
  int running = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t scheduler;
};

// One stack per thread of a block, with a guard page below each, made once per host thread.
// (Not inlined into run_block, whose getcontext would make its locals "clobbered".)
__attribute__((noinline)) char* fiber_stacks() {
  thread_local char* stacks = nullptr;
  if (stacks == nullptr) {
    const size_t total = kMaxBlockThreads * (kStackBytes + kGuardBytes);
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda emulation: cannot map the fiber stacks");
    stacks = static_cast<char*>(p);
    for (int i = 0; i < kMaxBlockThreads; ++i) mprotect(stacks + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
  }
  return stacks;
}

thread_local Block* g_block = nullptr;
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local std::string g_error_message;
std::mutex g_launch_mutex;

void record_error(cudaError_t code, const std::string& message) {
  if (g_last_error != cudaSuccess) return;
  g_last_error = code;
  g_error_message = message;
}

void enter(Block& b, int i) {
  b.running = i;
  threadIdx = b.fibers[i].index;
}

// Hands over to the next runnable fiber after the running one (itself included, last), or to the
// scheduler when none can run. The running fiber resumes here when it is next scheduled.
void switch_away() {
  Block& b = *g_block;
  Fiber& self = b.fibers[b.running];
  for (int k = 1; k <= b.size; ++k) {
    const int i = (b.running + k) % b.size;
    if (b.fibers[i].state == State::kRunnable) {
      if (&b.fibers[i] == &self) return;
      enter(b, i);
      swapcontext(&self.context, &b.fibers[i].context);
      return;
    }
  }
  swapcontext(&self.context, &b.scheduler);
}

void fiber_main() {
  Block& b = *g_block;
  b.body(b.context);
  b.fibers[b.running].state = State::kDone;
  --b.live;
  switch_away();  // never returns: a finished fiber is not runnable
}

std::string lanes(uint32_t mask) {
  char buf[16];
  snprintf(buf, sizeof(buf), "0x%08x", mask);
  return buf;
}

// Why no fiber can run although some have not finished.
std::string divergence_report(const Block& b) {
  for (size_t w = 0; w < b.warps.size(); ++w) {
    const Warp& warp = b.warps[w];
    if (warp.arrived == 0) continue;
    uint32_t exited = 0, barrier = 0;
    for (int lane = 0; lane < kWarpLanes; ++lane) {
      const size_t i = w * kWarpLanes + lane;
      if (i >= b.fibers.size()) break;
      if (b.fibers[i].state == State::kDone) exited |= 1u << lane;
      if (b.fibers[i].state == State::kAtBarrier) barrier |= 1u << lane;
    }
    return "warp " + std::to_string(w) + ": __shfl_xor_sync with mask " + lanes(warp.mask) +
           " was reached by lanes " + lanes(warp.arrived) + " only (lanes " + lanes(exited) +
           " had exited, lanes " + lanes(barrier) + " wait at __syncthreads)";
  }
  return "__syncthreads was reached by " + std::to_string(b.at_barrier) + " of the block's " +
         std::to_string(b.size) + " threads; the other " + std::to_string(b.size - b.live) +
         " had exited (a barrier in divergent code)";
}

void run_block(Block& b) {
  char* stacks = fiber_stacks();
  for (int i = 0; i < b.size; ++i) {
    Fiber& f = b.fibers[i];
    f.state = State::kRunnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks + i * (kStackBytes + kGuardBytes) + kGuardBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  for (Warp& w : b.warps) {
    w.mask = 0;
    w.arrived = 0;
    w.phase = 0;
  }
  b.live = b.size;
  b.at_barrier = 0;
  detail::shadow_reset();
  enter(b, 0);
  detail::g_in_block = true;
  swapcontext(&b.scheduler, &b.fibers[0].context);
  detail::g_in_block = false;
  if (b.live > 0 && g_last_error == cudaSuccess) {
    record_error(cudaErrorLaunchFailure, "block " + detail::running_block() + ": " + divergence_report(b));
  }
}

}  // namespace

namespace detail {

thread_local bool g_in_block = false;

int running_thread() { return g_block->running; }

std::string running_block() {
  return "(" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) +
         ")";
}

void fail_block(const std::string& message) {
  record_error(cudaErrorLaunchFailure, "block " + running_block() + ": " + message);
  Block& b = *g_block;
  swapcontext(&b.fibers[b.running].context, &b.scheduler);
  __builtin_unreachable();
}

}  // namespace detail

void misaligned_vector_access(const void* address) {
  char buf[32];
  snprintf(buf, sizeof(buf), "%p", address);
  const std::string message = std::string("thread ") + std::to_string(g_block ? g_block->running : 0) +
                              " accesses a 16-byte vector at " + buf +
                              ", which is not 16-byte aligned (a misaligned address on the GPU)";
  if (detail::g_in_block) detail::fail_block(message);
  throw std::logic_error("cuda emulation: " + message);
}

void __syncthreads() {
  Block& b = *g_block;
  if (++b.at_barrier == b.live) {
    for (Fiber& f : b.fibers) {
      if (f.state == State::kAtBarrier) f.state = State::kRunnable;
    }
    b.at_barrier = 0;
    detail::shadow_barrier();
    return;
  }
  b.fibers[b.running].state = State::kAtBarrier;
  switch_away();
}

uint32_t shuffle_xor_bits(unsigned mask, uint32_t bits, int lane_mask) {
  Block& b = *g_block;
  const int warp_index = b.running / kWarpLanes;
  const int lane = b.running % kWarpLanes;
  Warp& w = b.warps[warp_index];
  const std::string where = "warp " + std::to_string(warp_index) + " lane " + std::to_string(lane) + ": ";
  if (((mask >> lane) & 1u) == 0) detail::fail_block(where + "__shfl_xor_sync with mask " + lanes(mask) + " excludes the calling lane");
  if ((mask & ~w.present) != 0) {
    detail::fail_block(where + "__shfl_xor_sync mask " + lanes(mask) + " names lanes that do not exist (present: " +
                       lanes(w.present) + ")");
  }
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (mask != w.mask) {
    detail::fail_block(where + "__shfl_xor_sync with mask " + lanes(mask) + " while lanes " + lanes(w.arrived) +
                       " wait in one with mask " + lanes(w.mask));
  }
  const int source = lane ^ lane_mask;
  if (source >= kWarpLanes || ((mask >> source) & 1u) == 0) {
    detail::fail_block(where + "__shfl_xor_sync reads lane " + std::to_string(source) + ", outside the mask " + lanes(mask));
  }
  const int phase = w.phase;
  w.slots[phase][lane] = bits;
  w.arrived |= 1u << lane;
  if (w.arrived == w.mask) {
    for (int i = warp_index * kWarpLanes; i < b.size && i < (warp_index + 1) * kWarpLanes; ++i) {
      if (b.fibers[i].state == State::kAtWarp) b.fibers[i].state = State::kRunnable;
    }
    w.arrived = 0;
    w.phase ^= 1;
  } else {
    b.fibers[b.running].state = State::kAtWarp;
    switch_away();
  }
  return w.slots[phase][source];
}

void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* context) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxBlockThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    record_error(cudaErrorInvalidConfiguration,
                 "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                     ") of blocks (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                     std::to_string(block.z) + ") is not a valid launch configuration");
    return;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Block b;
  b.body = body;
  b.context = context;
  b.size = static_cast<int>(threads);
  b.fibers.resize(threads);
  for (int i = 0; i < b.size; ++i) {
    b.fibers[i].index = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  }
  b.warps.resize((threads + kWarpLanes - 1) / kWarpLanes);
  for (size_t w = 0; w < b.warps.size(); ++w) {
    const uint64_t in_warp = threads - w * kWarpLanes < kWarpLanes ? threads - w * kWarpLanes : kWarpLanes;
    b.warps[w].present = in_warp == 32 ? 0xffffffffu : (1u << in_warp) - 1;
  }
  Block* outer = g_block;
  g_block = &b;
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z && g_last_error == cudaSuccess; ++z) {
    for (unsigned y = 0; y < grid.y && g_last_error == cudaSuccess; ++y) {
      for (unsigned x = 0; x < grid.x && g_last_error == cudaSuccess; ++x) {
        blockIdx = {x, y, z};
        run_block(b);
      }
    }
  }
  g_block = outer;
}

cudaError_t cudaGetLastError() {
  const cudaError_t err = g_last_error;
  g_last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : g_error_message.c_str();
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device != 0) return cudaErrorInvalidValue;
  *value = kEmulatedSmCount;
  return cudaSuccess;
}

}  // namespace cuda_emulation
