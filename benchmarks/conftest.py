"""pytest configuration of the benchmark suite: what the result JSON records about the machine.

pytest-benchmark's `machine_info` (CPU, Python, OS) gets a `dpo_bench` entry: the device the suite
ran on, the CPU model, GPU name and driver, the versions of torch, triton, dpo_kernels and the peers,
how the extension was built, the thread count, the date, and the measured copy bandwidth of the
device (the ceiling of a memory-bound kernel). benchmarks/report.py prints these as its header.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess

import torch

from benchmarks.bench_grid import DEVICE, SMOKE
from benchmarks.ceilings import copy_bandwidth_gbs

if SMOKE:
    # The smoke run checks the harness and agreement at tiny shapes in seconds; compiling every
    # torch.compile'd row (the compiled references, CCE's CPU implementation) would take most of a
    # minute, so compiled functions run eagerly there. The full grid compiles them.
    torch.compiler.set_stance("force_eager")

DISTRIBUTIONS = ("torch", "triton", "dpo-kernels", "trl", "liger-kernel", "cut-cross-entropy", "transformers",
                 "pytest-benchmark")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model(machine_info: dict) -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return machine_info.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown"


def _gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {
        "device": DEVICE.type,
        "grid": "smoke" if SMOKE else DEVICE.type,
        "date": datetime.date.today().isoformat(),
        "cpu_model": _cpu_model(machine_info),
        "threads": torch.get_num_threads(),
        "versions": {name: _version(name) for name in DISTRIBUTIONS},
        "torch_cuda": torch.version.cuda,
    }
    try:
        from dpo_kernels.backends import extension  # noqa: PLC0415

        info["extension"] = extension.build_info()
    except Exception as exc:  # report, never fail the session over it
        info["extension"] = f"unavailable: {exc}"
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        info.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"sm_{props.major}{props.minor}", gpu_driver=_gpu_driver())
    if not SMOKE:
        info["copy_bandwidth_gbs"] = copy_bandwidth_gbs(DEVICE, (1 << 30) if DEVICE.type == "cuda" else (256 << 20))
    machine_info["dpo_bench"] = info
