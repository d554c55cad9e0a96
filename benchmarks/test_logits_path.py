"""pytest-benchmark: the logits path, `dk.sequence_logps`, forward and forward + backward.

    pytest benchmarks/test_logits_path.py --benchmark-only                      # the device's grid
    DPO_BENCH_SMOKE=1 pytest benchmarks/test_logits_path.py --benchmark-disable  # tiny, for CI

Every implementation gets the same logits `[S, T, V]` (normal, standard deviation 2, in the dtype),
labels (every position scored) and upstream gradient `[S]` of the per-sequence log-probs:

- reference: `log_softmax(logits.float())`, target gather, masked per-sequence sum
  (`dk.reference.sequence_logps`: what a trainer writes today), autograd;
- reference_compiled: `torch.compile(dynamic=True)` of the same function; its compilation happens in
  the warm-up, before anything is measured;
- dk_<backend>: `dk.sequence_logps(backend=...)` for every backend usable on the device (CPU: the C++
  kernel; GPU: Triton and CUDA C++; the Triton interpreter on CPU is a test tool, not benchmarked);
- dk_<backend>_inplace (forward + backward): `inplace_backward=True`, the gradient written into the
  logits' storage (each call gets a fresh copy of the logits, made untimed);
- dk_<backend>_extras: with every per-token extra (`extras=` entropy, mean_logits, is_top1,
  log_sum_sq_probs, computed in the same pass as the log-probs: what `dk.fused_dpo_loss` runs for
  TRL's metrics and WPO); the gradient flows through the log-probs, as for the others. Its ratio to
  dk_<backend> is the cost of the extras.

Forward runs under `torch.no_grad()`; forward + backward takes the gradient with
`torch.autograd.grad`. Each row's outputs (log-probs, gradient) are checked against the float64
oracle (benchmarks/agreement.py) before it is timed. `extra_info` holds the peak extra memory
(benchmarks/peak_memory.py), ratios to the reference row of the same run, and the achieved bandwidth
over the byte minimum: `N * V * b` forward (the logits read once), `3 * N * V * b` forward + backward
(read twice, the gradient written once).
"""

from __future__ import annotations

import functools

import pytest
import torch

import dpo_kernels as dk
from benchmarks.agreement import check_logits_path
from benchmarks.bench_grid import DEVICE, KERNEL_BACKENDS, benchmark_cases, for_grid_point, logits_shapes
from benchmarks.bench_record import measure_row

PATH = "logits"
EXTRAS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
MODES = ("forward", "forward_backward")


def _impls(mode: str) -> list:
    impls = ["reference", "reference_compiled"] + [f"dk_{b}{suffix}" for b in KERNEL_BACKENDS for suffix in ("", "_extras")]
    if mode == "forward_backward":
        impls += [f"dk_{b}_inplace" for b in KERNEL_BACKENDS]
    return impls


def reference_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return dk.reference.sequence_logps(logits, labels).logps


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference_logps, dynamic=True)


def _logps_function(impl: str):
    """(per-sequence log-probs of (logits, labels), whether the backward overwrites the logits)."""
    if impl == "reference":
        return reference_logps, False
    if impl == "reference_compiled":
        return _compiled_reference(), False
    backend = impl.removeprefix("dk_").removesuffix("_inplace").removesuffix("_extras")
    inplace = impl.endswith("_inplace")
    extras = EXTRAS if impl.endswith("_extras") else ()
    return (lambda logits, labels: dk.sequence_logps(logits, labels, backend=backend, inplace_backward=inplace,
                                                     extras=extras).logps), inplace


def _inputs(shape, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.empty(shape.S, shape.T, shape.V, dtype=dtype, device=DEVICE).normal_(0.0, 2.0, generator=gen)
    labels = torch.randint(0, shape.V, (shape.S, shape.T), generator=gen, device=DEVICE)
    upstream = torch.randn(shape.S, generator=gen, device=DEVICE)
    return logits, labels, upstream


@pytest.mark.parametrize("shape,dtype,mode,impl", benchmark_cases(logits_shapes(), MODES, _impls))
def test_logits_path(benchmark, shape, dtype, mode, impl):
    logits, labels, upstream = for_grid_point((PATH, shape, dtype), lambda: _inputs(shape, dtype))
    logps_of, overwrites = _logps_function(impl)

    if mode == "forward":
        def setup():
            return (logits,)

        def step(x):
            with torch.no_grad():
                return (logps_of(x, labels),)
    else:
        def setup():  # a fresh leaf; a fresh copy when the backward writes into it
            return ((logits.clone() if overwrites else logits.detach()).requires_grad_(),)

        def step(x):
            logps = logps_of(x, labels)
            (grad,) = torch.autograd.grad(logps, x, upstream)
            return logps.detach(), grad

    outputs = step(*setup())  # the warm-up: compiles what needs compiling
    check_logits_path(impl, logits, labels, upstream, *outputs)
    del outputs

    passes = 1 if mode == "forward" else 3
    measure_row(benchmark, path=PATH, mode=mode, impl=impl, dtype=dtype, shape=shape, step=step, setup=setup,
                byte_minimum=passes * shape.tokens * shape.V * logits.element_size())
