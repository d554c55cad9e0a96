"""`torch.compile(fullgraph=True)` traces through `dk.sequence_logps` (custom ops with fake
implementations, docs/design.md section 4) and gives the eager values and gradients."""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.logps import require_backend


def _inputs(S=3, T=7, V=1000, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, T + 1, V, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, V, (S, T), generator=gen)
    labels[0, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    labels[2] = -100  # all masked
    weights = torch.rand(S, T, generator=gen) + 0.5
    grad_logps = torch.randn(S, generator=gen)
    grad_token = torch.randn(S, T, generator=gen)
    return logits, labels, weights, grad_logps, grad_token


def _logps(logits, labels, weights, inplace_backward):
    # logits[:, :-1]: the usual strided view of a model's output, read in place
    out = dk.sequence_logps(
        logits[:, :-1], labels, shift=True, average=True, token_weights=weights,
        return_token_logps=True, inplace_backward=inplace_backward, backend="cpu",
    )
    return out.logps, out.num_tokens, out.token_logps


def _run(fn, dtype, inplace_backward, seed=0):
    logits, labels, weights, grad_logps, grad_token = _inputs(dtype=dtype, seed=seed)
    # the logits are a non-leaf, as a model's output is; their storage receives the gradient
    # with inplace_backward
    leaf = logits.clone().requires_grad_()
    logits = leaf * 1
    weights.requires_grad_()
    logps, num_tokens, token_logps = fn(logits, labels, weights, inplace_backward)
    loss = (logps * grad_logps).sum() + (token_logps * grad_token).sum()
    grad_leaf, grad_weights = torch.autograd.grad(loss, [leaf, weights])
    return logps, num_tokens, token_logps, grad_leaf, grad_weights, logits.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["fresh", "inplace"])
def test_compiled_matches_eager(dtype, inplace_backward):
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(_logps, fullgraph=True)
    eager = _run(_logps, dtype, inplace_backward)
    traced = _run(compiled, dtype, inplace_backward)
    names = ("logps", "num_tokens", "token_logps", "grad logits", "grad token_weights")
    for name, e, c in zip(names, eager, traced):
        assert c.dtype == e.dtype and c.shape == e.shape, name
        # The same kernels run on the same inputs; only the small [S, T] arithmetic around them
        # may be fused differently by Inductor: a few fp32 roundings, which can flip the one
        # rounding of a 16-bit gradient (one ulp, 2^-7 relative for bf16).
        rtol = 2.0**-7 if c.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(c, e, rtol=rtol, atol=1e-6, msg=name)
    # gradient of an all-masked row: exactly zero, compiled or not
    assert torch.equal(traced[3][2], torch.zeros_like(traced[3][2]))
    if inplace_backward:
        # the logits' storage holds the gradient (grad_leaf flows through `leaf * 1`)
        logits_after = traced[5]
        assert torch.equal(logits_after[:, :-1], traced[3][:, :-1])
    # and the values are right, not merely equal to eager
    logits, labels, weights, _, _ = _inputs(dtype=dtype)
    ref = dk.reference.sequence_logps(logits[:, :-1].double(), labels, shift=True, average=True,
                                      token_weights=weights.double(), compute_dtype=torch.float64)
    torch.testing.assert_close(traced[0].double(), ref.logps, rtol=1e-5, atol=1e-5)


def test_compiled_graph_has_no_breaks_and_reuses_code_across_calls():
    """fullgraph=True already forbids graph breaks; a second call on new values of the same
    shapes must reuse the compiled code (no recompilation per call)."""
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(_logps, fullgraph=True)
    first = _run(compiled, torch.float32, False)
    frames_after_first = counters["stats"]["unique_graphs"]
    assert frames_after_first >= 1
    second = _run(compiled, torch.float32, False, seed=1)
    assert counters["stats"]["unique_graphs"] == frames_after_first, "the second call recompiled"
    assert not torch.equal(second[0], first[0])  # it did compute on the new values
    eager = _run(_logps, torch.float32, False, seed=1)
    for e, c in zip(eager, second):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


def test_out_of_range_label_under_compile_is_an_error_not_a_wrong_number():
    """While tracing, the labels cannot be read, so validation of their range is skipped
    (validation.check_label_range); the C++ kernel then rejects the label itself."""
    require_backend("cpu", "cpu")
    torch._dynamo.reset()

    def fn(logits, labels):
        return dk.sequence_logps(logits, labels, backend="cpu").logps

    compiled = torch.compile(fn, fullgraph=True)
    logits = torch.randn(2, 3, 10)
    labels = torch.randint(0, 10, (2, 3))
    torch.testing.assert_close(compiled(logits, labels), fn(logits, labels), rtol=1e-6, atol=1e-6)
    labels[1, 2] = 10
    with pytest.raises(ValueError, match=r"\[1, 2\] = 10 is outside \[0, 10\)"):
        compiled(logits, labels)
