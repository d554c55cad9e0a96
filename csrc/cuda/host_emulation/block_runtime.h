// Interface between the emulation's scheduler (runtime.cpp) and its race detector
// (race_detector.cpp). Host code only; nothing here is seen by the kernels.
#pragma once

#include <cstdint>
#include <string>

namespace cuda_emulation::detail {

// True while a block's fibers run on this thread (the race detector ignores everything else).
extern thread_local bool g_in_block;

// Linear index of the running fiber in its block, and "(x, y, z)" of the running block.
int running_thread();
std::string running_block();

// Records `message` as the launch's error (the first one wins) and abandons the block: the
// running fiber never resumes, and the remaining blocks are skipped. Called from a fiber.
[[noreturn]] void fail_block(const std::string& message);

// Race detector: forget every shared-memory access (a new block starts), and start a new
// barrier interval (every thread passed a __syncthreads).
void shadow_reset();
void shadow_barrier();

}  // namespace cuda_emulation::detail
