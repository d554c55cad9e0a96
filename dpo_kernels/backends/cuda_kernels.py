"""Where the CUDA C++ kernels run: on a GPU, or on the CPU through their host emulation.

The launchers (`cuda_token_logps.py`, `cuda_tile_epilogues.py`) take one of these two targets;
only the extension's entry points, the tensors' device type and the stream differ:

    GPU       cuda_<kernel> entry points, CUDA tensors, the current CUDA stream of their device
    EMULATED  cuda_emulated_<kernel> entry points, CPU tensors, no stream: the same kernel sources
              compiled by the host compiler against csrc/cuda/host_emulation/ (a block's threads
              as fibers, shared-memory race detection), run synchronously; backend "cuda_emulated",
              for tests
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from . import extension


@dataclasses.dataclass(frozen=True)
class CudaKernels:
    prefix: str  # entry point name prefix in dpo_kernels._C
    device_type: str  # the tensors' device type
    backend: str  # the backend name, for messages

    def entry(self, kernel: str):
        """The extension's entry point of `kernel` (e.g. "token_logps_forward")."""
        ext = extension.load()
        if ext is None:
            raise RuntimeError(extension.load_error())
        name = self.prefix + kernel
        if not hasattr(ext, name):
            raise RuntimeError(f"this build of dpo_kernels._C has no {name} (backend {self.backend!r}); "
                               "python -m dpo_kernels.info says which backends are built")
        return getattr(ext, name)

    def on_device(self, device: torch.device):
        """The context to launch in: the tensors' CUDA device current, or nothing on the CPU."""
        return torch.cuda.device(device) if self.device_type == "cuda" else contextlib.nullcontext()

    def stream(self, device: torch.device) -> int:
        """The stream handle to enqueue on (0 for the emulation, which runs synchronously)."""
        return torch.cuda.current_stream(device).cuda_stream if self.device_type == "cuda" else 0


GPU = CudaKernels(prefix="cuda_", device_type="cuda", backend="cuda")
EMULATED = CudaKernels(prefix="cuda_emulated_", device_type="cpu", backend="cuda_emulated")
