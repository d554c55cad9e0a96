"""The benchmark grid: device, dtypes and shapes of both paths, chosen once per session.

Device: CUDA when PyTorch sees one, else CPU (`DPO_BENCH_DEVICE=cpu` forces CPU on a GPU machine).
`DPO_BENCH_SMOKE=1` shrinks every path to tiny shapes (CI: it checks agreement, times nothing).
`DPO_BENCH_DTYPES=float32,bfloat16` overrides the dtypes.
`DPO_BENCH_POINTS=centre` keeps only each path's first shape (the centre of the GPU cross), `rest` every
other one, `all` (the default) both: benchmarks/gpu_run.sh runs the centres in its first call and the
rest in its second.

Shapes, with N the number of scored tokens:

- logits path: logits `[S, T, V]`, every position scored (N = S * T), so the byte minimum of
  forward + backward is exactly `3 * N * V * bytes`;
- linear path: hidden `[2B, T, H]`, weight `[V, H]`, the first `T // 4` positions of every row masked
  as a prompt, T chosen so that the rows hold exactly N scored tokens (FLOPs `2 * N * H * V` per GEMM
  pass); the reference still projects every position, as plain PyTorch does.

CPU (a 2-core development machine; the whole suite in a few minutes): N in {512, 1536} x V in {8000,
32000}, H = 512, fp32 and bf16 (bf16 GEMMs are fast on CPUs with AVX-512 BF16 and the bf16 reference
is about 1.5x the fp32 one, so neither is absurdly slow).

GPU (one H100/H200 class device, within the two calls of benchmarks/gpu_run.sh: the centres in the
first, next to the build and the GPU tests, the rest in the second): a cross through one realistic centre instead of the full product, so that each sweep
has a line per implementation and the grid stays small (every point costs several compiled and
checked runs, and the centre runs first, so a run stopped at its time limit still has it); bf16 only
(what models train in; fp32 would double the run: `DPO_BENCH_DTYPES=float32,bfloat16`); logits path
N = 16384 with V in {32000, 128256, 151936} and V = 128256 with N in {4096, 32768}; linear path
H = 4096, N = 8192 with V in {32000, 128256, 151936}, V = 128256 with N in {4096, 16384}, and
H = 2048 at the centre.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Tuple

import pytest
import torch

import dpo_kernels as dk

SMOKE = os.environ.get("DPO_BENCH_SMOKE", "0") == "1"
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POINT_SETS = ("all", "centre", "rest")


def bench_device() -> torch.device:
    forced = os.environ.get("DPO_BENCH_DEVICE")
    if forced is not None:
        if forced not in ("cpu", "cuda"):
            raise ValueError(f"DPO_BENCH_DEVICE must be 'cpu' or 'cuda', got {forced!r}")
        if forced == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("DPO_BENCH_DEVICE=cuda, but PyTorch sees no CUDA device")
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"


def kernel_backends() -> Tuple[str, ...]:
    """dpo_kernels backends usable on DEVICE (CPU: the C++ kernels; GPU: Triton and CUDA C++). Triton's
    interpreter on CPU tensors (TRITON_INTERPRET=1) is a test tool, never benchmarked."""
    usable = dk.available_backends(DEVICE)
    return tuple(b for b in ("cpu", "triton", "cuda") if b in usable and not (b == "triton" and not ON_GPU))


KERNEL_BACKENDS = kernel_backends()


def bench_dtypes() -> Tuple[torch.dtype, ...]:
    names = os.environ.get("DPO_BENCH_DTYPES")
    if names is None:
        return (torch.bfloat16,) if ON_GPU and not SMOKE else (torch.float32, torch.bfloat16)
    unknown = [n for n in names.split(",") if n not in DTYPE_NAMES]
    if unknown:
        raise ValueError(f"DPO_BENCH_DTYPES must list names from {sorted(DTYPE_NAMES)}, got {unknown}")
    return tuple(DTYPE_NAMES[n] for n in names.split(","))


DTYPES = bench_dtypes()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class LogitsShape:
    """Logits `[S, T, V]`, every position scored: N = S * T tokens."""

    S: int
    T: int
    V: int

    @property
    def tokens(self) -> int:
        return self.S * self.T

    def as_dict(self) -> dict:
        return dict(S=self.S, T=self.T, V=self.V, N=self.tokens)

    @property
    def id(self) -> str:
        return f"N{self.tokens}-V{self.V}"


def prompt_length(T: int) -> int:
    return T // 4


def _length_for(scored_per_row: int) -> int:
    """The smallest T with T - T // 4 == scored_per_row (T - T // 4 steps by 0 or 1, so one exists)."""
    T = scored_per_row
    while T - prompt_length(T) < scored_per_row:
        T += 1
    return T


@dataclasses.dataclass(frozen=True)
class LinearShape:
    """Hidden `[2B, T, H]` with `T // 4` prompt positions per row, weight `[V, H]`; N scored tokens."""

    B: int
    T: int
    H: int
    V: int

    @classmethod
    def with_tokens(cls, tokens: int, pairs: int, H: int, V: int) -> "LinearShape":
        rows = 2 * pairs
        if tokens % rows:
            raise ValueError(f"tokens must be a multiple of the {rows} rows, got {tokens}")
        return cls(B=pairs, T=_length_for(tokens // rows), H=H, V=V)

    @property
    def tokens(self) -> int:
        return 2 * self.B * (self.T - prompt_length(self.T))

    def as_dict(self) -> dict:
        return dict(B=self.B, T=self.T, H=self.H, V=self.V, N=self.tokens)

    @property
    def id(self) -> str:
        return f"N{self.tokens}-H{self.H}-V{self.V}"


def _cross(centre: dict, sweeps: dict) -> list:
    """Every point of each one-dimensional sweep through `centre`, once each, centre first."""
    points = [dict(centre)]
    for name, values in sweeps.items():
        for value in values:
            point = dict(centre, **{name: value})
            if point not in points:
                points.append(point)
    return points


def grid_points(shapes: list) -> list:
    """The part of a path's shapes that `DPO_BENCH_POINTS` selects (the first shape is the centre)."""
    selected = os.environ.get("DPO_BENCH_POINTS", "all")
    if selected not in POINT_SETS:
        raise ValueError(f"DPO_BENCH_POINTS must be one of {POINT_SETS}, got {selected!r}")
    return {"all": shapes, "centre": shapes[:1], "rest": shapes[1:]}[selected]


def logits_shapes() -> list:
    if SMOKE:
        return [LogitsShape(S=2, T=24, V=500)]
    if ON_GPU:
        points = _cross(dict(N=16384, V=128256), dict(V=(32000, 151936), N=(4096, 32768)))
        return [LogitsShape(S=N // 2048, T=2048, V=V) for N, V in ((p["N"], p["V"]) for p in points)]
    return [LogitsShape(S=N // 256, T=256, V=V) for N in (512, 1536) for V in (8000, 32000)]


def linear_shapes() -> list:
    if SMOKE:
        return [LinearShape.with_tokens(48, pairs=2, H=32, V=500)]
    if ON_GPU:
        points = _cross(dict(N=8192, H=4096, V=128256), dict(V=(32000, 151936), N=(4096, 16384), H=(2048,)))
        return [LinearShape.with_tokens(p["N"], pairs=8, H=p["H"], V=p["V"]) for p in points]
    return [LinearShape.with_tokens(N, pairs=4, H=512, V=V) for N in (512, 1536) for V in (8000, 32000)]


def timing_rounds() -> int:
    """Timed calls per row (their median is reported): GPU calls take milliseconds but the run has a
    time limit; CPU calls take up to seconds on 2 cores."""
    return 1 if SMOKE else (5 if ON_GPU else 3)


def benchmark_cases(shapes, modes, impls_of_mode) -> list:
    """pytest params `(shape, dtype, mode, impl)`, grouped by grid point, each group's reference first
    (bench_record takes the ratios of later rows against it); only the shapes `DPO_BENCH_POINTS` selects."""
    cases = []
    for shape in grid_points(shapes):
        for dtype in DTYPES:
            for mode in modes:
                impls = impls_of_mode(mode)
                assert impls[0] == "reference", impls
                for impl in impls:
                    cases.append(pytest.param(shape, dtype, mode, impl,
                                              id=f"{shape.id}-{dtype_name(dtype)}-{mode}-{impl}"))
    return cases


_current: dict = {}


def for_grid_point(key, build):
    """`build()`, kept until another key is asked for: one grid point's inputs (and oracle) at a time,
    so GPU memory is freed when the suite moves on."""
    if key not in _current:
        _current.clear()
        _current[key] = build()
    return _current[key]
