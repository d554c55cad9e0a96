"""Every usable backend of `dk.sequence_logps` against the float64 reference: forward (logps,
num_tokens, token_logps) and gradients (w.r.t. the logits and the token weights), over shapes,
dtypes, masks, strides, shift, average, weights and extreme values. Bounds: python_tests/helpers/logps.py.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.logps import (
    Case,
    backend_params,
    check_against_reference,
    make_inputs,
    require_backend,
    run_backend,
    run_reference,
    supports_dtype,
)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# Hand-picked edge cases. Sizes stay small (V <= ~1000, S * T <= 32) so that the Triton kernels
# are quick under the interpreter; vocabulary sizes that span several kernel chunks are in
# LARGE_V_CASES.
EDGE_CASES = [
    # V = 1: every log-prob is 0 and every gradient 0
    Case(2, 3, 1, F32, mask="none"),
    Case(2, 3, 1, F64, mask="random", shift=True),
    Case(1, 4, 1, BF16, mask="none", weights=True, unbatched=True),
    # single-token rows, S = 1
    Case(4, 1, 257, F32, mask="none"),
    Case(4, 1, 257, F64, mask="all_masked_row"),
    Case(1, 1, 1000, F32, mask="none"),
    Case(1, 1, 1000, F32, mask="none", shift=True),  # shift leaves nothing: logps 0, num_tokens 0
    Case(1, 7, 1000, F32, mask="prompt_padding", shift=True, average=True, weights=True),
    # masks
    Case(3, 8, 1000, F32, mask="none"),
    Case(3, 8, 1000, F32, mask="prompt", shift=True),
    Case(3, 8, 1000, F32, mask="padding"),
    Case(4, 8, 1000, F32, mask="all_masked_row", average=True),
    Case(4, 8, 1000, F32, mask="all_masked_row", average=True, weights=True, shift=True),
    Case(2, 4, 300, F32, mask="all", average=True, weights=True),
    Case(2, 4, 300, F32, mask="all"),
    # dtypes
    Case(3, 8, 1000, F64, mask="prompt_padding", shift=True, weights=True),
    Case(3, 8, 1000, F64, mask="random", average=True),
    Case(3, 8, 1000, BF16, mask="prompt_padding", shift=True, weights=True),
    Case(3, 8, 1000, BF16, mask="random", average=True),
    Case(3, 8, 1000, F16, mask="prompt_padding", shift=True, weights=True),
    Case(3, 8, 1000, F16, mask="random", average=True),
    # strides
    Case(2, 6, 1000, F32, layout="big_view", mask="prompt", shift=True),
    Case(2, 6, 1000, BF16, layout="big_view", mask="random", weights=True),
    Case(2, 6, 1000, F64, layout="big_view", mask="random"),
    Case(2, 6, 257, F32, layout="drop_last", mask="padding", weights=True),
    Case(2, 6, 257, F16, layout="drop_last", mask="prompt", shift=True),
    Case(2, 6, 1000, F32, layout="offset_view", mask="random", weights=True),
    Case(2, 6, 257, BF16, layout="offset_view", mask="prompt", shift=True),
    Case(2, 6, 257, F64, layout="offset_view", mask="padding", average=True),
    Case(1, 6, 300, F16, layout="offset_view", mask="random", unbatched=True),
    Case(3, 5, 1000, F32, layout="transposed", mask="random", shift=True, average=True),
    Case(3, 5, 1000, BF16, layout="transposed", mask="none"),
    Case(3, 5, 1000, F64, layout="transposed", mask="prompt", weights=True),
    Case(3, 4, 500, F32, layout="expanded", mask="random"),
    Case(3, 4, 500, F64, layout="expanded", mask="random", shift=True, weights=True),
    # 2-D [N, V] input: one sequence
    Case(1, 9, 1000, F32, mask="prompt", shift=True, weights=True, unbatched=True),
    Case(1, 9, 1000, F64, mask="none", average=True, unbatched=True),
    Case(1, 9, 257, BF16, layout="big_view", mask="random", unbatched=True),
    Case(1, 9, 257, F32, layout="drop_last", mask="random", upstream="logps", unbatched=True),
    # only logps get an upstream gradient (token_logps not returned)
    Case(2, 8, 1000, F32, mask="random", upstream="logps"),
    Case(2, 8, 1000, F64, mask="prompt", shift=True, weights=True, average=True, upstream="logps"),
    # extreme logits: +-1e4 (near ties at the top, and wide spreads), rows with -inf entries
    Case(2, 8, 1000, F32, mask="random", values="extreme"),
    Case(2, 8, 1000, F64, mask="random", values="extreme", weights=True),
    Case(2, 8, 1000, BF16, mask="random", values="extreme", shift=True),
    Case(2, 8, 1000, F16, mask="none", values="extreme"),
    Case(2, 8, 1000, F32, mask="random", values="neginf", shift=True, weights=True),
    Case(2, 8, 1000, F64, mask="none", values="neginf", average=True),
    Case(2, 8, 1000, BF16, mask="prompt", values="neginf"),
    Case(2, 8, 1000, F16, mask="none", values="neginf"),
    Case(2, 4, 3, F32, mask="none", values="neginf"),
    # other ignore_index values
    Case(2, 8, 300, F32, mask="random", ignore_index=-1, shift=True),
    Case(2, 8, 300, F32, mask="random", ignore_index=0, weights=True),
]

# Vocabularies spanning several chunks of every kernel (the C++ kernel walks 2048 at a time; the
# Triton kernel 256 under the interpreter, up to 4096 compiled), none a multiple of them.
LARGE_V_CASES = [
    Case(2, 3, 5001, F32, mask="random", shift=True, weights=True),
    Case(2, 3, 4097, BF16, layout="big_view", mask="prompt"),
    Case(1, 4, 2049, F64, mask="none", average=True),
    Case(2, 2, 33001, F32, mask="none", values="extreme"),
    Case(2, 2, 9000, F16, layout="transposed", mask="random", values="neginf"),
]


def _random_cases(count: int, seed: int):
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        unbatched = rng.random() < 0.15
        S = 1 if unbatched else rng.choice([1, 2, 3, 4])
        T = rng.randint(1, 32 // S if not unbatched else 16)
        V = rng.choice([1, 2, 3, 17, 100, 255, 256, 257, 511, 513, 1000, 1023])
        layouts = ["contiguous", "big_view", "drop_last", "offset_view"] + ([] if unbatched else ["transposed"])
        case = Case(
            S, T, V,
            dtype=rng.choice([F64, F32, F32, BF16, F16]),
            layout=rng.choice(layouts),
            mask=rng.choice(["none", "prompt", "padding", "prompt_padding", "all_masked_row", "random"]),
            shift=rng.random() < 0.5,
            average=rng.random() < 0.4,
            weights=rng.random() < 0.4,
            upstream="both" if rng.random() < 0.8 else "logps",
            unbatched=unbatched,
            values=rng.choice(["normal"] * 4 + ["extreme", "neginf"]),
            ignore_index=rng.choice([-100, -100, -1]),
        )
        if case.id not in {c.id for c in cases}:
            cases.append(case)
    return cases


def _random_large_cases(count: int, seed: int):
    """Bigger shapes for the compiled kernels only (the C++ CPU kernel, and CUDA when present):
    vocabularies around and past the C++ kernel's 2048-element chunks and real vocabulary sizes."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        S = rng.choice([1, 2, 4, 8])
        case = Case(
            S, rng.randint(1, 128 // S), rng.choice([2047, 2048, 2049, 4095, 6000, 32000, 50257]),
            dtype=rng.choice([F64, F32, BF16, F16]),
            layout=rng.choice(["contiguous", "big_view", "drop_last", "offset_view", "transposed"]),
            mask=rng.choice(["none", "prompt_padding", "all_masked_row", "random"]),
            shift=rng.random() < 0.5, average=rng.random() < 0.4, weights=rng.random() < 0.4,
            values=rng.choice(["normal", "normal", "extreme", "neginf"]),
        )
        if case.id not in {c.id for c in cases}:
            cases.append(case)
    return cases


# The cases are drawn from a fixed seed; set DPO_KERNELS_TEST_SEED to draw others (fuzzing).
_SEED = int(os.environ.get("DPO_KERNELS_TEST_SEED", "20240607"))
RANDOM_CASES = _random_cases(120, seed=_SEED)
RANDOM_LARGE_CASES = _random_large_cases(30, seed=_SEED + 1)


def _params(cases, backends=("cpu", "triton", "cuda", "reference", "cuda_emulated")):
    out = []
    for bp in backend_params(backends):
        backend, device = bp.values
        for case in cases:
            if supports_dtype(backend, case.dtype):
                out.append(pytest.param(backend, device, case, id=f"{bp.id}-{case.id}", marks=bp.marks))
    return out


def _check(backend, device, case):
    require_backend(backend, device)
    inputs = make_inputs(case, device)
    got = run_backend(case, inputs, backend)
    ref = run_reference(case, inputs)
    check_against_reference(case, inputs, got, ref, backend)


@pytest.mark.parametrize("backend,device,case", _params(EDGE_CASES))
def test_edge_cases_match_reference(backend, device, case):
    _check(backend, device, case)


@pytest.mark.parametrize("backend,device,case", _params(RANDOM_CASES))
def test_random_cases_match_reference(backend, device, case):
    _check(backend, device, case)


@pytest.mark.parametrize("backend,device,case", _params(LARGE_V_CASES, backends=("cpu", "triton", "cuda", "cuda_emulated")))
def test_vocabulary_spanning_several_chunks_matches_reference(backend, device, case):
    _check(backend, device, case)


@pytest.mark.parametrize(
    "backend,device,case", _params(RANDOM_LARGE_CASES, backends=("cpu", "cuda", "cuda_emulated"))
)
def test_random_large_cases_match_reference(backend, device, case):
    _check(backend, device, case)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_integer_label_dtypes(backend, device, label_dtype):
    """Any integer labels dtype gives bitwise the results of int64 labels."""
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 6, 200, generator=gen).to(device)
    labels = torch.randint(0, 200, (2, 6), generator=gen).to(device)
    labels[0, :2] = 255 if label_dtype == torch.uint8 else -1
    ignore = int(labels[0, 0])
    expected = dk.sequence_logps(logits, labels, ignore_index=ignore, shift=True, return_token_logps=True,
                                 backend=backend)
    got = dk.sequence_logps(logits, labels.to(label_dtype), ignore_index=ignore, shift=True,
                            return_token_logps=True, backend=backend)
    assert torch.equal(got.logps, expected.logps) and torch.equal(got.token_logps, expected.token_logps)
    assert got.num_tokens.tolist() == [4, 5]  # with shift, labels[0, 0] is no target anyway


@pytest.mark.parametrize("backend,device", backend_params())
def test_non_contiguous_labels_and_weights(backend, device):
    """Strided labels and token_weights (views of larger tensors) give bitwise the results of
    contiguous copies, gradients included."""
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(8)
    S, T, V = 3, 5, 300
    logits = torch.randn(S, T, V, generator=gen).to(device)
    labels_big = torch.randint(0, V, (T, 2 * S), generator=gen).to(device)
    labels_big[0] = -100
    weights_big = torch.rand(T, 2 * S, generator=gen).to(device)
    labels = labels_big.t()[::2]  # [S, T], strides (2, 2S)
    weights = weights_big.t()[::2]
    assert not labels.is_contiguous() and not weights.is_contiguous()

    results = []
    for lab, w in ((labels, weights), (labels.contiguous(), weights.contiguous())):
        x = logits.clone().requires_grad_()
        w = w.clone().requires_grad_() if w.is_contiguous() else w.detach().requires_grad_()
        out = dk.sequence_logps(x, lab, shift=True, token_weights=w, return_token_logps=True, backend=backend)
        grads = torch.autograd.grad(out.logps.sum() + out.token_logps.sum(), [x, w])
        results.append((out.logps, out.token_logps, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", backend_params())
def test_v1_and_all_masked_rows_are_exact(backend, device):
    """Values the kernels must get exactly: V = 1 gives log-prob 0 and gradient 0 everywhere; an
    all-masked row gives logps 0, num_tokens 0 (also with average) and a zero gradient, never NaN."""
    require_backend(backend, device)
    dtype = torch.float32
    x = torch.randn(2, 5, 1, device=device, dtype=dtype, requires_grad=True)
    labels = torch.zeros(2, 5, dtype=torch.long, device=device)
    out = dk.sequence_logps(x, labels, backend=backend, return_token_logps=True)
    assert torch.equal(out.logps, torch.zeros(2, device=device))
    assert torch.equal(out.token_logps, torch.zeros(2, 5, device=device))
    (grad,) = torch.autograd.grad(out.logps.sum() + out.token_logps.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))

    x = torch.randn(3, 4, 50, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (3, 4), device=device)
    labels[1] = -100
    out = dk.sequence_logps(x, labels, backend=backend, average=True, return_token_logps=True)
    assert out.logps[1].item() == 0.0 and out.num_tokens[1].item() == 0
    assert out.num_tokens.tolist() == [4, 0, 4]
    assert torch.isfinite(out.logps).all() and out.logps[0].item() < 0
    (grad,) = torch.autograd.grad(out.logps.sum(), x)
    assert torch.equal(grad[1], torch.zeros_like(grad[1])) and grad[0].abs().sum() > 0
