"""Peak extra memory of one call: the most bytes held at once by what the call allocates.

- CUDA (`call_peak_bytes` on a CUDA device): `torch.cuda.max_memory_allocated` during the call
  minus `torch.cuda.memory_allocated` before it, after resetting the peak statistics. It counts
  every block the caching allocator hands out (Triton and CUDA kernels' workspaces included, since
  they allocate through PyTorch), not the cuBLAS workspace or the allocator's cached free blocks.
- CPU (`call_peak_bytes` on CPU, `allocator_peak_bytes`): the PyTorch profiler's allocation events
  (`profile_memory=True`): every allocation and free of PyTorch's CPU allocator during the call, in
  time order; the peak of their running sum. This sees buffers of compiled code too (TorchInductor
  allocates through the same allocator), which `allocation_peak_bytes` cannot: under its dispatch
  mode `torch.compile`d functions fall back to eager. Memory allocated outside PyTorch (malloc in a
  library) is not seen; the C++ kernels of this package allocate none.
- `allocation_peak_bytes`: storages created by PyTorch ops, counted exactly through a dispatch mode
  from the op that creates them until PyTorch frees them (python_tests/linear/test_linear_memory.py checks
  the linear path's memory formula with it). On eager code it agrees with `allocator_peak_bytes` to
  a few KiB.

Outputs the call returns (gradients, say) count: they are memory the call needed. Tensors that
existed before the call never count. Python's cyclic garbage collector is paused during the call, so
that it cannot free older objects in the middle of a measurement.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Callable, Iterator

import torch


def call_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Runs `fn()` once and returns its peak extra memory on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    if device.type == "cpu":
        return allocator_peak_bytes(fn)
    raise ValueError(f"device must be a CPU or CUDA device, got {device}")


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    with _collector_paused():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
    return max(peak, 0)


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


def allocator_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of the CPU allocator's allocation events (bytes; frees negative)
    recorded by the PyTorch profiler while `fn()` runs."""
    from torch._C._profiler import _EventType  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with _collector_paused(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError as exc:  # a private API: say which PyTorch lacks it
        raise RuntimeError(f"torch {torch.__version__}: the profiler's event tree is not available ({exc})") from exc
    allocations = sorted((e for e in _walk(tree) if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    held = peak = 0
    for event in allocations:
        if event.extra_fields.device.type != "cpu":
            continue
        held += event.extra_fields.alloc_size
        peak = max(peak, held)
    return peak


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


def _backend_keys(args) -> "torch._C.DispatchKeySet":
    """The backend dispatch key of the first tensor argument (CPU or CUDA): redispatching to it
    runs a custom op's implementation itself, below the dispatch mode."""
    device = next(a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)).device
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU)


def allocation_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by the tensors that `fn()` creates through PyTorch ops (forward and any
    backward it runs), counted exactly with a dispatch mode rather than from the resident set:
    a storage counts from the op that creates it until PyTorch frees it. Memory allocated outside
    PyTorch is not seen (the C++ kernels of this package allocate none). Storages that existed
    before the call (and views of them) never count; the implementations of this package's
    custom ops (dpo_kernels::*) run under the mode too, so what they allocate inside counts.
    `torch.compile`d code runs eagerly under the mode: use `allocator_peak_bytes` for it."""
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    tracker = _AllocationTracker()
    existing = set()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for value in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in tracker.seen:
                    existing.add(value.untyped_storage()._cdata)
            if func.namespace == "dpo_kernels":  # a custom op: count what its implementation allocates inside
                with self:
                    out = func.redispatch(_backend_keys(args), *args, **(kwargs or {}))
            else:
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
