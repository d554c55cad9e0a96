// csrc/cuda/token_logps_forward.cu built unchanged by the host compiler for the emulation (see cuda_emulation.h).
#include "cuda/host_emulation/cuda_emulation.h"
#include "cuda/token_logps_forward.cu"
