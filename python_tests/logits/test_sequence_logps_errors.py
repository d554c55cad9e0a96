"""Bad input to `dk.sequence_logps` raises a clear exception before any kernel runs (docs/design.md section
5): each test checks the exception type and that the message names the offending argument."""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.backends import availability, cpu_token_logps
from dpo_kernels.backends.availability import BackendUnavailableError

S, T, V = 2, 5, 50


def _good(device="cpu", dtype=torch.float32):
    logits = torch.randn(S, T, V, device=device, dtype=dtype)
    labels = torch.randint(0, V, (S, T), device=device)
    return logits, labels


@pytest.fixture(autouse=True)
def no_kernel_runs(monkeypatch):
    """Validation happens before any kernel: make the CPU launchers fail loudly if reached. (Tests
    that expect a successful call undo this with `allow_kernels`.)"""

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the bad argument was rejected")

    launchers = [cpu_token_logps]
    if availability.unavailable_reason("triton") is None:
        from dpo_kernels.backends import triton_token_logps

        launchers.append(triton_token_logps)
    for module in launchers:
        monkeypatch.setattr(module, "forward", forbidden)
        monkeypatch.setattr(module, "backward", forbidden)
    return monkeypatch


@pytest.fixture
def allow_kernels(no_kernel_runs):
    no_kernel_runs.undo()


@pytest.mark.parametrize("shape", [(V,), (1, S, T, V), ()], ids=["1d", "4d", "0d"])
def test_wrong_logits_rank(shape):
    logits = torch.randn(shape)
    labels = torch.zeros(shape[:-1] if shape else (), dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits must be 2-D or 3-D"):
        dk.sequence_logps(logits, labels, backend="cpu")


def test_logits_not_a_tensor():
    with pytest.raises(TypeError, match=r"logits must be a torch\.Tensor"):
        dk.sequence_logps([[0.0, 1.0]], torch.zeros(1, dtype=torch.long), backend="cpu")


@pytest.mark.parametrize(
    "labels_shape", [(S, T + 1), (S + 1, T), (S * T,), (S, T, 1)], ids=["T+1", "S+1", "flat", "3d"]
)
def test_labels_shape_mismatch(labels_shape):
    logits, _ = _good()
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 5\)"):
        dk.sequence_logps(logits, labels, backend="cpu")


def test_labels_shape_mismatch_unbatched():
    logits = torch.randn(T, V)
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\)"):
        dk.sequence_logps(logits, torch.zeros(1, T, dtype=torch.long), backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool, torch.complex64], ids=str)
def test_non_integer_labels(dtype):
    logits, labels = _good()
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        dk.sequence_logps(logits, labels.to(dtype), backend="cpu")


def test_labels_not_a_tensor():
    logits, labels = _good()
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor"):
        dk.sequence_logps(logits, labels.tolist(), backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("bad", [-1, -99, -101, V, V + 7], ids=lambda b: f"label{b}")
def test_labels_out_of_range(backend, bad):
    if availability.unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(availability.unavailable_reason(backend, torch.device("cpu")))
    logits, labels = _good()
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=rf"labels\[1, 3\] = {bad} is outside \[0, {V}\)"):
        dk.sequence_logps(logits, labels, backend=backend)
    # also when the bad label is only reachable with shift (and for a 2-D call)
    with pytest.raises(ValueError, match=r"labels\[2\] = .* is outside"):
        dk.sequence_logps(logits[0], torch.tensor([0, 1, bad, 3, 4]), shift=True, backend=backend)


def test_ignore_index_is_honoured_by_the_range_check(allow_kernels):
    logits, labels = _good()
    labels[0, 0] = -1
    out = dk.sequence_logps(logits, labels, ignore_index=-1, backend="cpu")
    assert out.num_tokens.tolist() == [T - 1, T]
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = -1 .*ignore_index \(-100\)"):
        dk.sequence_logps(logits, labels, backend="cpu")


def test_token_weights_wrong_shape():
    logits, labels = _good()
    with pytest.raises(ValueError, match=r"token_weights must have the shape of labels \(2, 5\)"):
        dk.sequence_logps(logits, labels, token_weights=torch.ones(S, T + 1), backend="cpu")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
def test_token_weights_wrong_dtype(dtype):
    logits, labels = _good()
    with pytest.raises(TypeError, match=r"token_weights must be a floating-point tensor"):
        dk.sequence_logps(logits, labels, token_weights=torch.ones(S, T, dtype=dtype), backend="cpu")


def test_token_weights_not_a_tensor():
    logits, labels = _good()
    with pytest.raises(TypeError, match=r"token_weights must be a torch\.Tensor or None"):
        dk.sequence_logps(logits, labels, token_weights=[[1.0] * T] * S, backend="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_devices_mismatch():
    logits, labels = _good()
    with pytest.raises(ValueError, match=r"labels is on cuda:0 but logits is on cpu"):
        dk.sequence_logps(logits, labels.cuda(), backend="reference")
    with pytest.raises(ValueError, match=r"labels is on cpu but logits is on cuda"):
        dk.sequence_logps(logits.cuda(), labels, backend="reference")
    with pytest.raises(ValueError, match=r"token_weights is on cuda:0 but labels is on cpu"):
        dk.sequence_logps(logits, labels, token_weights=torch.ones(S, T, device="cuda"), backend="reference")


@pytest.mark.parametrize("backend", ["gpu", "Triton", "torch", "", None, 3])
def test_unknown_backend_name(backend):
    logits, labels = _good()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cuda', 'cpu', 'reference', "
                                         r"'cuda_emulated'\)"):
        dk.sequence_logps(logits, labels, backend=backend)


def test_triton_on_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(availability, "triton_interpreting", lambda: False)
    if availability._triton_missing() is not None:
        expected = r"backend 'triton' is unavailable: Triton"
    else:
        expected = r"backend 'triton' is unavailable: Triton kernels run on CUDA tensors.*TRITON_INTERPRET=1"
    logits, labels = _good()
    with pytest.raises(BackendUnavailableError, match=expected):
        dk.sequence_logps(logits, labels, backend="triton")
    assert "triton" not in dk.available_backends("cpu")


@pytest.mark.parametrize("backend,device", [("cuda", "cpu"), ("cpu", "cuda")])
def test_backend_on_the_wrong_device(backend, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    logits, labels = _good(device)
    with pytest.raises(BackendUnavailableError, match=rf"backend '{backend}' is unavailable: backend '{backend}' runs on"):
        dk.sequence_logps(logits, labels, backend=backend)


def test_float64_with_triton():
    if availability.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(availability.unavailable_reason("triton", torch.device("cpu")))
    logits, labels = _good(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"logits dtype float64 is supported by backend='cpu' and backend='reference' only"):
        dk.sequence_logps(logits, labels, backend="triton")


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.float8_e4m3fn], ids=str)
def test_unsupported_logits_dtype(dtype):
    logits, labels = _good()
    with pytest.raises(TypeError, match=r"logits must be float32, bfloat16 or float16"):
        dk.sequence_logps(logits.to(dtype), labels, backend="cpu")


@pytest.mark.parametrize("view", ["every_other", "transposed_vt"])
def test_non_unit_stride_over_vocabulary(view):
    big = torch.randn(S, T, 2 * V)
    logits = big[..., ::2] if view == "every_other" else torch.randn(S, V, T).transpose(1, 2)
    _, labels = _good()
    with pytest.raises(ValueError, match=r"logits must have unit stride over its last dimension"):
        dk.sequence_logps(logits, labels, backend="cpu")


@pytest.mark.parametrize("flag", ["shift", "average", "return_token_logps", "inplace_backward"])
@pytest.mark.parametrize("value", [1, 0, "yes", None, torch.tensor(True)], ids=["1", "0", "str", "None", "tensor"])
def test_non_bool_flags(flag, value):
    logits, labels = _good()
    with pytest.raises(TypeError, match=rf"{flag} must be a bool"):
        dk.sequence_logps(logits, labels, backend="cpu", **{flag: value})


@pytest.mark.parametrize("value", [True, 1.0, "-100", None])
def test_non_int_ignore_index(value):
    logits, labels = _good()
    with pytest.raises(TypeError, match=r"ignore_index must be an int"):
        dk.sequence_logps(logits, labels, ignore_index=value, backend="cpu")


@pytest.mark.parametrize("shape", [(S, T, 0), (T, 0)], ids=["3d", "2d"])
def test_empty_vocabulary(shape):
    """No label can be valid without a vocabulary; V = 0 is rejected up front (the Triton kernel
    cannot even be launched with it)."""
    logits = torch.randn(shape)
    labels = torch.full(shape[:-1], -100)
    with pytest.raises(ValueError, match=r"logits must have a vocabulary \(last\) dimension of size >= 1"):
        dk.sequence_logps(logits, labels, backend="cpu")
