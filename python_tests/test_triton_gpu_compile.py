"""The Triton kernels compile to Hopper and Ampere machine code, checked without a GPU.

The interpreter tests prove the kernels' arithmetic; this proves that the real compiler (Triton's
NVIDIA backend with its bundled ptxas) accepts them for sm_90 and sm_80 for every logits dtype, so
a GPU run does not fail on a construct only the interpreter allows. It runs in a subprocess because
the test session sets TRITON_INTERPRET=1, under which `triton.jit` builds interpreter functions.
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
    from dpo_kernels.backends import triton_token_logps as kernels

    CONSTEXPRS = {"_token_logps_forward_kernel": {"BLOCK_V": 4096},
                  "_token_logps_backward_kernel": {"SPAN": 16384, "BLOCK_V": 4096}}
    for kernel_name, constexprs in CONSTEXPRS.items():
        kernel = getattr(kernels, kernel_name)
        for dtype in ("fp32", "bf16", "fp16"):
            signature = {}
            for name in kernel.arg_names:
                if name in constexprs:
                    signature[name] = "constexpr"
                elif name in ("logits_ptr", "out_ptr"):
                    signature[name] = "*" + dtype
                elif name == "targets_ptr":
                    signature[name] = "*i64"
                elif name.endswith("_ptr"):
                    signature[name] = "*fp32"
                else:
                    signature[name] = "i64"
            for arch in (90, 80):
                source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
                assert len(compiled.asm["cubin"]) > 0
                print(kernel_name, dtype, f"sm_{arch}", "ok")
    """
)


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
    assert result.stdout.count(" ok") == 2 * 3 * 2, result.stdout
