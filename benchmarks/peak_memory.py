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
import weakref
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


class _AllocationTracker:
    """Counts the bytes of storages created by PyTorch ops while active; each is uncounted when
    PyTorch frees it (storage objects keep their Python object alive as long as the storage lives,
    so a finalizer fires exactly then)."""

    def __init__(self):
        self.held = 0
        self.peak = 0
        self.seen = set()

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.seen:
            return
        self.seen.add(key)
        nbytes = storage.nbytes()
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key, nbytes) -> None:
        self.seen.discard(key)
        self.held -= nbytes


def allocation_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by the tensors that `fn()` creates through PyTorch ops (forward and any
    backward it runs), counted exactly with a dispatch mode rather than from the resident set:
    a storage counts from the op that creates it until PyTorch frees it. Memory allocated outside
    PyTorch is not seen (the C++ kernels of this package allocate none). Storages that existed
    before the call (and views of them) never count."""
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    tracker = _AllocationTracker()
    existing = set()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for value in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in tracker.seen:
                    existing.add(value.untyped_storage()._cdata)
            out = func(*args, **(kwargs or {}))
            for value in torch.utils._pytree.tree_leaves(out):
                if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in existing:
                    tracker.add(value)
            return out

    gc.collect()
    with Mode():
        result = fn()
    del result
    return tracker.peak
