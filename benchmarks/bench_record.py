"""Measuring one benchmark row and recording it, shared by every benchmark file.

A row is one implementation at one (path, mode, dtype, shape). After the caller's warm-up (which
compiles what needs compiling, and whose outputs the caller has checked against the oracle),
`measure_row` takes the peak extra memory of one call (benchmarks/peak_memory.call_peak_bytes),
then times `timing_rounds()` calls with pytest-benchmark (`setup` untimed; CUDA work synchronised
inside the timed call), and fills `benchmark.extra_info`:

- `path`, `mode`, `impl`, `dtype`, `device`, `threads`, `shape` (with `N`, the scored tokens);
- `peak_extra_bytes`, `median_s`;
- `time_vs_reference`, `memory_vs_reference`: against the `reference` row of the same (path, mode,
  dtype, shape) measured earlier in this run (the parametrisation puts it first);
- the roofline: `byte_minimum` and `bandwidth_gbs` (memory-bound work: the bytes that must move over
  the median time) or `flops` and `tflops` (GEMM-bound work).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch

from benchmarks.bench_grid import DEVICE, dtype_name, timing_rounds
from benchmarks.peak_memory import call_peak_bytes

REFERENCE = "reference"
_reference_rows: dict = {}


def _synchronised(fn: Callable) -> Callable:
    if DEVICE.type != "cuda":
        return fn

    def call(*args):
        out = fn(*args)
        torch.cuda.synchronize(DEVICE)
        return out

    return call


def measure_row(benchmark, *, path: str, mode: str, impl: str, dtype: torch.dtype, shape, step: Callable,
                setup: Callable[[], Tuple], byte_minimum: Optional[int] = None, flops: Optional[int] = None) -> None:
    """Peak memory and timing of `step(*setup())`, recorded in `benchmark.extra_info` (module docstring)."""
    if (byte_minimum is None) == (flops is None):
        raise ValueError("measure_row needs exactly one of byte_minimum (memory-bound) or flops (GEMM-bound)")
    step = _synchronised(step)
    setup = _synchronised(setup)
    peak = call_peak_bytes(functools.partial(step, *setup()), DEVICE)  # its inputs are made before
    benchmark.pedantic(step, setup=lambda: (setup(), {}), rounds=timing_rounds(), iterations=1, warmup_rounds=0)

    info = benchmark.extra_info
    info.update(path=path, mode=mode, impl=impl, dtype=dtype_name(dtype), device=DEVICE.type,
                threads=torch.get_num_threads(), shape=shape.as_dict(), peak_extra_bytes=peak)
    if byte_minimum is not None:
        info["byte_minimum"] = byte_minimum
    else:
        info["flops"] = flops
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is None:  # --benchmark-disable: nothing timed
        return
    median = stats.median
    info["median_s"] = median
    if byte_minimum is not None:
        info["bandwidth_gbs"] = byte_minimum / median / 1e9
    else:
        info["tflops"] = flops / median / 1e12
    key = (path, mode, dtype, shape)
    if impl == REFERENCE:
        _reference_rows[key] = (median, peak)
    if key in _reference_rows:
        ref_median, ref_peak = _reference_rows[key]
        info["time_vs_reference"] = median / ref_median
        info["memory_vs_reference"] = peak / max(ref_peak, 1)
