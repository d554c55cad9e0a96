"""The one module that touches the compiled extension `dpo_kernels._C`.

Loading never raises: when the module is missing or broken, `load()` returns None and
`load_error()` says why and how to build it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

_BUILD_HINT = (
    "build it with `pip install -e .` (or `pip install .`) from a source checkout; "
    "see README, section Install"
)


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from dpo_kernels import _C  # noqa: PLC0415  (the import is what may fail)
    except ImportError as exc:
        return None, f"the compiled extension dpo_kernels._C could not be imported ({exc}); {_BUILD_HINT}"
    return _C, None


def load():
    """The extension module, or None when it is not built."""
    return _load()[0]


def load_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it loaded."""
    return _load()[1]


def build_info() -> dict:
    """How the extension was built ({} when it is not built)."""
    ext = load()
    return dict(ext.build_info()) if ext is not None else {}


def dtype_code(dtype: torch.dtype) -> int:
    ext = load()
    codes = {
        torch.float32: ext.DTYPE_FLOAT32,
        torch.float16: ext.DTYPE_FLOAT16,
        torch.bfloat16: ext.DTYPE_BFLOAT16,
        torch.float64: ext.DTYPE_FLOAT64,
    }
    return codes[dtype]
