"""The CUDA C++ kernels' host emulation (csrc/cuda/host_emulation/, backend "cuda_emulated"): it is
built without nvcc, listed but never picked by "auto", refuses CUDA tensors, and its detectors
catch each kind of defect they are meant to (kernels with one deliberate defect each). The
kernels' numerics through it are covered by the backend-parametrised suites."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.backends import extension
from dpo_kernels.backends.availability import resolve_backend, unavailable_reason


def _ext():
    reason = unavailable_reason("cuda_emulated", torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    return extension.load()


def test_emulation_is_built_listed_and_never_auto():
    _ext()
    assert extension.build_info()["cuda_emulation"] is True
    assert "cuda_emulated" in dk.available_backends("cpu")
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    report = subprocess.run([sys.executable, "-m", "dpo_kernels.info"], capture_output=True, text=True, check=True)
    assert any(line.split()[:3] == ["cuda_emulated", "cpu", "usable"] for line in report.stdout.splitlines()), \
        report.stdout


def test_emulation_refuses_cuda_tensors():
    reason = unavailable_reason("cuda_emulated", torch.device("cuda"))
    assert reason is not None
    if torch.cuda.is_available():
        assert "CPU tensors" in reason


def test_correct_kernel_passes_the_detectors():
    _ext().cuda_emulated_check_detector("neighbour_exchange")


@pytest.mark.parametrize("name,report", [
    ("missing_barrier", ["missing_barrier(float*)::slots", "missing __syncthreads"]),
    ("write_write", ["write_write(float*)::slot` (byte 0)", "thread 1 writes", "thread 0 wrote", "write-write race"]),
    ("uninitialised_read", ["uninitialised_read(float*)::slots` (byte 0)", "no thread of the block has written"]),
    ("partial_warp_shuffle", ["warp 0", "mask 0xffffffff", "lanes 0x0000ffff only", "0xffff0000 had exited"]),
    ("divergent_barrier", ["__syncthreads was reached by 32 of the block's 64 threads"]),
    ("misaligned_vector", ["thread 0 accesses a 16-byte vector", "not 16-byte aligned"]),
])
def test_detector_reports_the_defect(name, report):
    with pytest.raises(RuntimeError) as info:
        _ext().cuda_emulated_check_detector(name)
    message = str(info.value)
    assert message.startswith(f"CUDA kernel {name} failed: block (0, 0, 0): "), message
    for part in report:
        assert part in message, message
