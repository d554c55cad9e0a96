"""Which module launches each kernel on each backend: one explicit table.

    kernel_module("token_logps", "cpu")      -> backends/cpu_token_logps.py     (logits path)
    kernel_module("tile_epilogues", "cuda")  -> backends/cuda_tile_epilogues.py (linear path)

The modules are imported on first use, not here: the Triton ones must not load before
TRITON_INTERPRET is settled (tests set it), and importing Triton costs about a second.
"""

from __future__ import annotations

import importlib
from types import ModuleType

KERNEL_MODULES = {
    "token_logps": {
        "cpu": "cpu_token_logps",
        "triton": "triton_token_logps",
        "cuda": "cuda_token_logps",
        "cuda_emulated": "cuda_emulated_token_logps",
    },
    "tile_epilogues": {
        "cpu": "cpu_tile_epilogues",
        "triton": "triton_tile_epilogues",
        "cuda": "cuda_tile_epilogues",
        "cuda_emulated": "cuda_emulated_tile_epilogues",
    },
}


def kernel_module(kernel: str, backend: str) -> ModuleType:
    """The launcher module of `kernel` ("token_logps" or "tile_epilogues") on `backend`."""
    try:
        name = KERNEL_MODULES[kernel][backend]
    except KeyError:
        raise ValueError(
            f"no {kernel!r} launcher for backend {backend!r}; known: "
            + ", ".join(f"{k}: {sorted(v)}" for k, v in KERNEL_MODULES.items())
        ) from None
    return importlib.import_module(f"{__package__}.{name}")
