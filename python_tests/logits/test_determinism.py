"""Determinism: the same inputs give bitwise the same logps, token_logps and gradients."""

from __future__ import annotations

import pytest
import torch

from python_tests.helpers.logps import Case, backend_params, make_inputs, require_backend, run_backend, supports_dtype
from python_tests.helpers.logps import KERNEL_BACKENDS

CPU_CASES = [
    Case(4, 16, 5001, torch.float32, mask="prompt_padding", shift=True, weights=True),
    Case(4, 16, 5001, torch.bfloat16, layout="big_view", mask="random", average=True),
    Case(4, 16, 3001, torch.float64, layout="transposed", mask="random", weights=True),
]
SMALL_CASES = [
    Case(2, 8, 1000, torch.float32, mask="prompt_padding", shift=True, weights=True),
    Case(2, 8, 1000, torch.float16, layout="drop_last", mask="random", average=True),
]


def _run_twice(case, backend, device, **kw):
    results = []
    for _ in range(2):
        inputs = make_inputs(case, device)
        results.append(run_backend(case, inputs, backend, **kw))
    return results


def _assert_bitwise_equal(a, b):
    assert torch.equal(a.logps, b.logps)
    assert torch.equal(a.num_tokens, b.num_tokens)
    assert torch.equal(a.token_logps, b.token_logps)
    assert torch.equal(a.grad_logits, b.grad_logits)
    if a.grad_weights is not None:
        assert torch.equal(a.grad_weights, b.grad_weights)


def _params():
    out = []
    for bp in backend_params(KERNEL_BACKENDS):
        backend, device = bp.values
        cases = CPU_CASES if backend == "cpu" else SMALL_CASES
        if device == "cuda":
            cases = CPU_CASES  # compiled kernels: no interpreter-size limit
        for case in cases:
            if supports_dtype(backend, case.dtype):
                out.append(pytest.param(backend, device, case, id=f"{bp.id}-{case.id}", marks=bp.marks))
    return out


@pytest.mark.parametrize("backend,device,case", _params())
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["fresh", "inplace"])
def test_identical_calls_are_bitwise_identical(backend, device, case, inplace_backward):
    require_backend(backend, device)
    first, second = _run_twice(case, backend, device, inplace_backward=inplace_backward)
    _assert_bitwise_equal(first, second)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_results_do_not_depend_on_the_thread_count(case):
    """Each token row is reduced by one thread, in a fixed order: the number of OpenMP threads
    (torch.get_num_threads()) must not change a single bit."""
    require_backend("cpu", "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_backend(case, make_inputs(case), "cpu")
        torch.set_num_threads(max(2, before))
        many = run_backend(case, make_inputs(case), "cpu")
    finally:
        torch.set_num_threads(before)
    _assert_bitwise_equal(one, many)
