"""Which backends exist, which are usable for a given device, and why not when they are not."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import List, Optional

import torch

from . import extension

# "cuda_emulated": the CUDA C++ kernels run on CPU tensors by their host emulation, for tests
# (slow, deterministic, with shared-memory race detection); "auto" never picks it.
BACKENDS = ("triton", "cuda", "cpu", "reference", "cuda_emulated")
BACKEND_CHOICES = ("auto",) + BACKENDS


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that is not built or cannot run on the given tensors."""


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET is set: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _triton_missing() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed; `pip install triton` (Linux) provides it"
    try:
        import triton  # noqa: F401, PLC0415
    except Exception as exc:  # a broken install must not break `import dpo_kernels`
        return f"Triton failed to import ({exc})"
    return None


def _cuda_kernels_missing() -> Optional[str]:
    ext = extension.load()
    if ext is None:
        return extension.load_error()
    if not ext.build_info()["cuda"]:
        return (
            "the extension was built without CUDA (nvcc was not found, or DPO_KERNELS_CUDA=0); "
            "install the CUDA toolkit and rebuild with DPO_KERNELS_CUDA=1 pip install -e ."
        )
    if not hasattr(ext, "cuda_token_logps_forward"):
        return "this build of the extension has no CUDA C++ kernels for the logits path"
    if ext.cuda_device_count() == 0:
        return "no CUDA device is visible to the extension"
    return None


def _cuda_emulation_missing() -> Optional[str]:
    ext = extension.load()
    if ext is None:
        return extension.load_error()
    if not hasattr(ext, "cuda_emulated_token_logps_forward"):
        return "this build of the extension has no CUDA host emulation (it is built on Linux with GCC or Clang)"
    return None


def unavailable_reason(backend: str, device: Optional[torch.device | str] = None) -> Optional[str]:
    """None when `backend` can run here (on tensors on `device`, when given), else why not."""
    device = torch.device(device) if isinstance(device, str) else device
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    on_cuda = device is not None and device.type == "cuda"
    on_cpu = device is not None and device.type == "cpu"
    if device is not None and not (on_cuda or on_cpu):
        return f"dpo_kernels runs on CPU and CUDA tensors, not on {device.type}"
    if on_cuda and not torch.cuda.is_available():
        return "no CUDA device is available to PyTorch"
    if backend == "reference":
        return None
    if backend == "cpu":
        if on_cuda:
            return f"backend 'cpu' runs on CPU tensors, but the tensors are on {device}"
        return extension.load_error()
    if backend == "triton":
        missing = _triton_missing()
        if missing is not None:
            return missing
        if on_cpu and not triton_interpreting():
            return (
                "Triton kernels run on CUDA tensors; for CPU tensors use backend='cpu' "
                "(or set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter, for testing)"
            )
        if device is None and not (torch.cuda.is_available() or triton_interpreting()):
            return "no CUDA device (and TRITON_INTERPRET is not set)"
        return None
    if backend == "cuda_emulated":
        if on_cuda:
            return f"backend 'cuda_emulated' runs the CUDA kernels' host emulation on CPU tensors, but the tensors are on {device}"
        return _cuda_emulation_missing()
    # backend == "cuda"
    if on_cpu:
        return f"backend 'cuda' runs on CUDA tensors, but the tensors are on {device}"
    return _cuda_kernels_missing()


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Backends that are built and usable here (for tensors on `device`, when given)."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


@functools.lru_cache(maxsize=None)
def _warn_fallback(device_type: str, reasons: str) -> None:
    warnings.warn(
        f"dpo_kernels: no fused backend is usable for {device_type} tensors ({reasons}); "
        "falling back to the unfused reference implementation",
        RuntimeWarning,
        stacklevel=4,
    )


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`. Raises BackendUnavailableError with the reason.
    torch.compile evaluates it once while tracing and treats the answer as a constant."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
        return backend
    preference = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    reasons = []
    for name in preference:
        reason = unavailable_reason(name, device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    _warn_fallback(device.type, "; ".join(reasons))
    return "reference"
