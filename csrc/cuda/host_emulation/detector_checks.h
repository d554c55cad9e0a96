// Kernels with one deliberate defect each, run by the emulation to show that its detectors catch
// them (detector_checks.cpp). Emulation build only.
#pragma once

#include <string>

namespace dpo::cuda {

// Runs check kernel `name` (neighbour_exchange: correct; missing_barrier, write_write,
// uninitialised_read, partial_warp_shuffle, divergent_barrier, misaligned_vector: defective). Throws
// std::runtime_error with the emulation's report when the launch fails, std::invalid_argument for
// an unknown name.
void check_detector(const std::string& name);

}  // namespace dpo::cuda
