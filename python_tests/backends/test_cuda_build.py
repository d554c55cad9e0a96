"""The CUDA part of the extension: built whenever nvcc is found, for the architectures it reports,
with the kernel entry points the "cuda" backend and the linear path call, and a clear refusal where
the backend cannot run. Kernel correctness on a GPU is covered by the backend-parametrised tests."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.backends import extension
from dpo_kernels.backends.availability import unavailable_reason

ENTRY_POINTS = (
    "cuda_token_logps_forward",
    "cuda_token_logps_backward",
    "cuda_tile_fold_stats",
    "cuda_tile_logits_grad",
)


def _cuda_build_expected() -> str | None:
    """None when the installed extension must contain the CUDA kernels, else why not."""
    if os.environ.get("DPO_KERNELS_CUDA", "auto").strip().lower() in ("0", "off", "false", "no"):
        return "DPO_KERNELS_CUDA=0: the extension is built without CUDA on purpose"
    if shutil.which("nvcc") is None:
        return "nvcc is not on PATH, so the build skips the CUDA kernels"
    return None


def _built_cuda_extension():
    reason = _cuda_build_expected()
    if reason is not None:
        pytest.skip(reason)
    ext = extension.load()
    assert ext is not None, f"nvcc is on PATH but the extension did not load: {extension.load_error()}"
    return ext


def test_extension_built_with_cuda_for_hopper():
    ext = _built_cuda_extension()
    info = ext.build_info()
    assert info["cuda"] is True, f"nvcc is on PATH but the extension was built without CUDA: {info}"
    archs = [a.strip() for a in info["cuda_archs"].split(",")]
    assert "90" in archs, f"no native Hopper (sm_90) code: cuda_archs = {info['cuda_archs']!r}"
    assert info["cuda_version"], "cuda_version is empty in a CUDA build"
    missing = [name for name in ENTRY_POINTS if not hasattr(ext, name)]
    assert not missing, f"CUDA entry points missing from the extension: {missing}"


def test_cuda_device_count_without_crash():
    ext = _built_cuda_extension()
    count = ext.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if count == 0:
        assert "no CUDA device" in unavailable_reason("cuda")


@pytest.mark.parametrize("prefix", ["cuda_", "cuda_emulated_"])
def test_cuda_entry_points_reject_bad_arguments_before_launching(prefix):
    # Host-side checks run before any CUDA call, so they hold without a GPU or driver; the host
    # emulation (cuda_emulated_*, built without nvcc too) runs the same launchers.
    if prefix == "cuda_":
        ext = _built_cuda_extension()
    else:
        ext = extension.load()
        if not hasattr(ext, "cuda_emulated_token_logps_forward"):
            pytest.skip("this build has no CUDA host emulation")

    def entry(kernel):
        return getattr(ext, prefix + kernel)

    rows = dict(S=1, T=1, V=8, stride_s=8, stride_t=8, targets=0, ignore_index=-100)
    with pytest.raises(ValueError, match="float64"):
        entry("token_logps_forward")(logits=0, dtype=ext.DTYPE_FLOAT64, token_logps=0, row_stats=0, stats=0,
                                     stream=0, **rows)
    with pytest.raises(ValueError, match="dtype code"):
        entry("token_logps_backward")(logits=0, dtype=99, row_stats=0, grad=0, entropy_grad=0, entropy=0, out=0,
                                      out_stride_s=8, out_stride_t=8, stream=0, **rows)
    with pytest.raises(ValueError, match="entropy_grad and entropy must be given together"):
        entry("token_logps_backward")(logits=0, dtype=ext.DTYPE_FLOAT32, row_stats=0, grad=0, entropy_grad=8,
                                      entropy=0, out=0, out_stride_s=8, out_stride_t=8, stream=0, **rows)
    with pytest.raises(ValueError, match="aligned"):
        entry("token_logps_forward")(logits=2, dtype=ext.DTYPE_FLOAT32, token_logps=0, row_stats=0, stats=0,
                                     stream=0, **rows)
    with pytest.raises(ValueError, match="required"):
        entry("tile_fold_stats")(tile=0, dtype=ext.DTYPE_BFLOAT16, rows=4, chunk=8, ld=8, v0=0, targets=0,
                                 max=0, sum_exp=0, target_logit=0)
    with pytest.raises(ValueError, match="ld >= chunk"):
        entry("tile_logits_grad")(tile=0, dtype=ext.DTYPE_FLOAT32, rows=4, chunk=8, ld=4, v0=0, targets=0,
                                  row_stats=0, grad=0)


def test_cuda_backend_on_cpu_tensors_is_refused_with_the_reason():
    logits = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    with pytest.raises(dk.BackendUnavailableError) as info:
        dk.sequence_logps(logits, labels, backend="cuda")
    message = str(info.value)
    assert "'cuda'" in message and "CUDA tensors" in message and "cpu" in message, message
