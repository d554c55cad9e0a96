"""Peak extra memory of one call, on CPU or CUDA.

CUDA: `torch.cuda.max_memory_allocated` around the call, minus what was allocated before.
CPU: the process's peak resident set (VmHWM) during the call minus its resident set before. The
peak is reset first by writing "5" to /proc/self/clear_refs (Linux). This counts every page the
call touches for the first time (its allocations that get written), which is what a user runs out
of; allocations made and never written do not count. Measurements are within a few MiB (malloc
arenas); compare sizes of hundreds of MiB, not single tensors.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        _status_bytes("VmHWM")
    except OSError:
        return False
    return True


def peak_extra_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Runs `fn()` once and returns the peak memory it used beyond what existed before it."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _status_bytes("VmRSS")
        result = fn()
        peak = _status_bytes("VmHWM") - before
    del result
    return max(peak, 0)
