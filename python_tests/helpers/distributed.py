"""Helpers of the distributed tests: real gloo process groups on CPU, one process per rank,
started with torch.multiprocessing.spawn and rendezvousing through a FileStore in the test's
tmp_path (no network port). A worker is a module-level function `fn(rank, world_size, *args)` that
asserts what it checks; an exception in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

# a rank waiting in a collective that another rank never reaches fails after this, not after 30 min
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def distributed_unavailable() -> Optional[str]:
    """Why the gloo tests cannot run here, or None."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available():
        return "this PyTorch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this PyTorch build has no gloo backend"
    return None


requires_gloo = pytest.mark.skipif(distributed_unavailable() is not None,
                                   reason=distributed_unavailable() or "")


def _entry(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)  # ranks share the machine's cores; results do not depend on threads
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, tmp_path, *args) -> None:
    """Runs `fn(rank, world_size, *args)` on `world_size` gloo ranks (fresh CPU processes); raises
    whatever a rank raised.

    The processes come from torch.multiprocessing's "forkserver" start method with torch and
    dpo_kernels preloaded: the server is a fresh interpreter (started once per test session, it
    never ran an OpenMP region, so forking it is safe) and each rank is a fork of it, so a rank
    starts in milliseconds instead of re-importing torch (seconds) as "spawn" does (the fallback
    where there is no forkserver)."""
    store_path = os.path.join(str(tmp_path), f"store-{fn.__name__}-{world_size}")
    method = "forkserver" if "forkserver" in torch.multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        torch.multiprocessing.get_context(method).set_forkserver_preload(["torch", "torch.distributed", "dpo_kernels"])
    torch.multiprocessing.start_processes(_entry, args=(world_size, store_path, fn, args), nprocs=world_size,
                                          join=True, start_method=method)


def even_ranges(vocab_size: int, world_size: int) -> List[Tuple[int, int]]:
    local = vocab_size // world_size
    return [(r * local, (r + 1) * local) for r in range(world_size)]


def uneven_ranges(world_size: int) -> Tuple[int, List[Tuple[int, int]]]:
    """(V, ranges by rank): unequal slices (one of a single id) held in reversed order (rank 0 holds
    the top of the vocabulary)."""
    sizes = [1, 9, 4, 13][:world_size]
    sizes[-1] += 3 if world_size == 2 else 0
    starts = [sum(sizes[:i]) for i in range(world_size)]
    ranges = [(s, s + n) for s, n in zip(starts, sizes)]
    return sum(sizes), ranges[::-1]


class CollectiveBytes:
    """Counts the bytes each collective of torch.distributed that this process issues puts in:
    `numel * element_size` of the tensor of `all_reduce` / `broadcast` / ..., of the input of
    `all_gather` (patched on the torch.distributed module, where the library looks them up at call
    time). `calls` lists (name, bytes) in order."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "gather", "scatter")

    def __init__(self):
        self.calls: List[Tuple[str, int]] = []

    @contextmanager
    def counting(self):
        import torch.distributed as dist  # noqa: PLC0415

        originals: Dict[str, Callable] = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

        def wrap(name, original):
            def counted(*args, **kwargs):
                if name == "all_gather":
                    tensor = args[1] if len(args) > 1 else kwargs["tensor"]
                else:
                    tensor = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
                self.calls.append((name, tensor.numel() * tensor.element_size()))
                return original(*args, **kwargs)
            return counted

        for name, original in originals.items():
            setattr(dist, name, wrap(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)

    def total(self) -> int:
        return sum(n for _, n in self.calls)

    def reset(self) -> None:
        self.calls.clear()
