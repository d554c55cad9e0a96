"""The Triton kernels compile to Hopper and Ampere machine code, checked without a GPU.

The interpreter tests prove the kernels' arithmetic; this proves that the real compiler (Triton's
NVIDIA backend with its bundled ptxas) accepts them for sm_90 and sm_80 for every logits / tile
dtype and every constexpr variant a launcher can select (the logits path's forward, plain and with
the extras, and backward, with and without the entropy term; the
linear path's tile fold, lean and with the extras, and tile gradient, with and without the entropy
term, each with and without soft-capping), so a GPU run does not fail on a construct only the
interpreter allows. It runs in a subprocess because the test session sets TRITON_INTERPRET=1,
under which `triton.jit` builds interpreter functions.
Skipped where a CUDA device exists (the GPU tests then compile and run the kernels for real).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dpo_kernels.backends import triton_tile_epilogues as tiles
    from dpo_kernels.backends import triton_token_logps as logps

    LEAN = dict(CENTERED=False, SUM_SQ=False, SUM_LOGITS=False, BEFORE=False, AFTER=False)
    EXTRAS = dict(CENTERED=True, SUM_SQ=True, SUM_LOGITS=True, BEFORE=True, AFTER=True)
    # (kernel, the pointers in the logits / tile dtype, constexpr variants): every variant the
    # launchers can select, at the launchers' GPU block sizes.
    KERNELS = [
        (logps._token_logps_forward_kernel, ("logits_ptr",),
         [{"BLOCK_V": 4096, "EXTRAS": extras} for extras in (False, True)]),
        (logps._token_logps_backward_kernel, ("logits_ptr", "out_ptr"),
         [{"SPAN": 16384, "BLOCK_V": 4096, "HAS_ENTROPY": ent} for ent in (False, True)]),
        (tiles._fold_tile_kernel, ("tile_ptr",),
         [dict(HAS_SOFTCAP=cap, **extras, BLOCK=2048 if extras["CENTERED"] else 4096)
          for cap in (False, True) for extras in (LEAN, EXTRAS)]),
        (tiles._tile_grad_kernel, ("tile_ptr",),
         [dict(HAS_SOFTCAP=cap, HAS_ENTROPY=ent, SPAN=8192, BLOCK=2048) for cap in (False, True)
          for ent in (False, True)]),
    ]
    FLOAT_ARGS = ("in_scale", "out_scale", "grad_scale")
    for kernel, dtype_ptrs, variants in KERNELS:
        for constexprs in variants:
            for dtype in ("fp32", "bf16", "fp16"):
                signature = {}
                for name in kernel.arg_names:
                    if name in constexprs:
                        signature[name] = "constexpr"
                    elif name in dtype_ptrs:
                        signature[name] = "*" + dtype
                    elif name == "targets_ptr":
                        signature[name] = "*i64"
                    elif name.endswith("_ptr"):
                        signature[name] = "*fp32"
                    elif name in FLOAT_ARGS:
                        signature[name] = "fp32"
                    else:
                        signature[name] = "i64"
                for arch in (90, 80):
                    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                              options={"num_warps": 8})
                    assert len(compiled.asm["cubin"]) > 0
                    flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
                    print(kernel.__name__, flags, dtype, f"sm_{arch}", "ok")
    """
)
# kernels x constexpr variants: token logps forward 2 (plain / extras), backward 2 (with / without
# entropy); tile fold 4 (lean / extras,
# with / without softcap), tile grad 4 (with / without softcap, with / without entropy)
_VARIANTS = 2 + 2 + 4 + 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the GPU tests compile and run the kernels")
def test_triton_kernels_compile_for_sm90_and_sm80():
    pytest.importorskip("triton")
    from triton.backends import backends  # noqa: PLC0415

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; set to silence Triton 3.9's notice
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(" ok") == _VARIANTS * 3 * 2, result.stdout
