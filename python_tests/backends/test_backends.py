"""Backend discovery and selection: `dk.available_backends()`, `backend="auto"`, the fallback to the
reference, and `python -m dpo_kernels.info`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.backends import availability, extension
from dpo_kernels.backends.availability import BACKENDS, BackendUnavailableError, unavailable_reason


def _small_call(backend, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 300, generator=gen).to(device)
    labels = torch.randint(0, 300, (2, 6), generator=gen).to(device)
    labels[0, :2] = -100
    out = dk.sequence_logps(logits, labels, shift=True, return_token_logps=True, backend=backend)
    ref = dk.reference.sequence_logps(logits.double(), labels, shift=True, compute_dtype=torch.float64)
    return out, ref


def test_extension_is_built():
    """The test suite runs on a built package: a missing or broken `dpo_kernels._C` must show up as a
    failure here, not as a suite where every CPU-kernel test quietly skips."""
    assert extension.load() is not None, extension.load_error()
    info = extension.build_info()
    assert {"openmp", "compiler", "cuda", "cuda_version", "cuda_archs"} <= set(info)


def test_available_backends_lists_reference_and_cpu():
    names = dk.available_backends()
    assert isinstance(names, list)
    assert "reference" in names and "cpu" in names
    assert len(set(names)) == len(names) and set(names) <= set(BACKENDS)
    # in the order of preference of BACKENDS
    assert names == [b for b in BACKENDS if b in names]
    assert dk.available_backends("cpu") == dk.available_backends(torch.device("cpu"))
    assert "cuda" not in dk.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_listed_backends_run_and_unlisted_ones_say_why(backend):
    """available_backends('cpu') is the truth: a listed backend computes the right values on CPU
    tensors, an unlisted one raises BackendUnavailableError carrying unavailable_reason()."""
    if backend in dk.available_backends("cpu"):
        out, ref = _small_call(backend)
        torch.testing.assert_close(out.logps.double(), ref.logps, rtol=1e-5, atol=1e-4)
        assert torch.equal(out.num_tokens, ref.num_tokens)
    else:
        reason = unavailable_reason(backend, torch.device("cpu"))
        assert reason
        with pytest.raises(BackendUnavailableError) as info:
            _small_call(backend)
        assert f"backend {backend!r} is unavailable" in str(info.value)
        assert reason in str(info.value)


def test_backend_unavailable_error_is_exported_and_a_runtime_error():
    assert dk.BackendUnavailableError is BackendUnavailableError
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_unavailable_reason_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        unavailable_reason("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        unavailable_reason("tpu")


def test_auto_on_cpu_is_the_cpu_kernel():
    if "cpu" not in dk.available_backends("cpu"):
        pytest.skip(unavailable_reason("cpu", torch.device("cpu")))
    auto, _ = _small_call("auto")
    cpu, _ = _small_call("cpu")
    reference, _ = _small_call("reference")
    assert torch.equal(auto.logps, cpu.logps) and torch.equal(auto.token_logps, cpu.token_logps)
    # and distinguishably not the reference path (different fp32 arithmetic)
    assert not torch.equal(auto.token_logps, reference.token_logps)


def test_auto_falls_back_to_the_reference_with_a_warning(monkeypatch):
    real = availability.unavailable_reason
    reason = "pretend the extension is missing (test_auto_falls_back_to_the_reference_with_a_warning)"

    def fake(backend, device=None):
        return reason if backend == "cpu" else real(backend, device)

    monkeypatch.setattr(availability, "unavailable_reason", fake)
    with pytest.warns(RuntimeWarning, match=r"no fused backend is usable for cpu tensors \(cpu: pretend the extension.*falling back to the unfused reference"):
        auto, ref = _small_call("auto")
    explicit, _ = _small_call("reference")
    assert torch.equal(auto.logps, explicit.logps)
    torch.testing.assert_close(auto.logps.double(), ref.logps, rtol=1e-5, atol=1e-4)
    with pytest.raises(BackendUnavailableError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        _small_call("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_auto_on_cuda_is_a_fused_kernel():
    usable = [b for b in ("triton", "cuda") if unavailable_reason(b, torch.device("cuda")) is None]
    if not usable:
        pytest.skip("no fused CUDA backend usable here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        auto, ref = _small_call("auto", "cuda")
    first, _ = _small_call(usable[0], "cuda")
    assert torch.equal(auto.logps, first.logps)


def test_info_module_prints_backends_and_versions():
    if importlib.util.find_spec("dpo_kernels.info") is None:
        pytest.skip("dpo_kernels/info.py does not exist yet")
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_kernels.info"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert dk.__version__ in text
    assert torch.__version__ in text
    if availability._triton_missing() is None:
        import triton

        assert triton.__version__ in text
    info = extension.build_info()
    if info.get("cuda"):
        assert info["cuda_version"] in text and info["cuda_archs"] in text
    for name in BACKENDS:
        assert name in text
    # the report says which backends are usable, with the same verdict as the library, for the
    # environment the subprocess inherited
    lines = [line for line in text.splitlines() if line.strip().startswith(("cpu ", "reference "))]
    assert any("usable" in line and "unavailable" not in line for line in lines), text
