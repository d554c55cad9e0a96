// Stand-in for the CUDA header in the host emulation build (see ../cuda_emulation.h).
#pragma once

#include "cuda/host_emulation/cuda_emulation.h"
