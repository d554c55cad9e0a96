"""`python -m dpo_kernels.info`: what is built and usable here, with versions, for bug reports."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__
from .backends import extension
from .backends.availability import BACKENDS, unavailable_reason


def _triton_version() -> str:
    try:
        import triton  # noqa: PLC0415
    except Exception as exc:  # report, never fail
        return f"not available ({exc.__class__.__name__})"
    return triton.__version__


def report() -> str:
    """A plain-text report of versions, the extension build and every backend's status."""
    lines = [
        f"dpo_kernels {__version__}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton      {_triton_version()}",
    ]
    info = extension.build_info()
    if info:
        cuda = f"CUDA {info['cuda_version']} for sm {info['cuda_archs']}" if info["cuda"] else "no CUDA kernels"
        if info.get("cuda_emulation"):
            cuda += " (their host emulation: built)"
        lines.append(f"extension   built with {info['compiler']}, OpenMP {'on' if info['openmp'] else 'off'}, {cuda}")
    else:
        lines.append(f"extension   not available: {extension.load_error()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}      {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("cuda        no device")
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    lines.append(f"backends (for tensors on {' / '.join(devices)})")
    for name in BACKENDS:
        for device in devices:
            reason = unavailable_reason(name, torch.device(device))
            status = "usable" if reason is None else f"unavailable: {reason}"
            lines.append(f"  {name:<13} {device:<4}  {status}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
