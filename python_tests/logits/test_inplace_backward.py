"""`inplace_backward=True`: the logits gradient is written into the logits' own storage.

It must equal, bitwise, the gradient the same backend writes into a fresh buffer; the tensor that
autograd hands back must be that storage (no second `[S, T, V]` buffer); and memory outside the
logits view (other rows and columns of the tensor the view was cut from) must be untouched.
"""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.logps import Case, backend_params, make_inputs, require_backend, run_backend, supports_dtype
from python_tests.helpers.logps import KERNEL_BACKENDS

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

CASES = [
    Case(2, 6, 1000, F32, layout="contiguous", mask="prompt_padding", shift=True, weights=True),
    Case(2, 6, 1000, F32, layout="big_view", mask="random", average=True),
    Case(2, 6, 1000, BF16, layout="big_view", mask="prompt", shift=True),
    Case(2, 6, 257, F16, layout="drop_last", mask="random", weights=True),
    Case(2, 6, 300, F32, layout="offset_view", mask="random", shift=True, weights=True),
    Case(1, 6, 300, BF16, layout="offset_view", mask="prompt", unbatched=True),
    Case(2, 6, 257, F32, layout="drop_last", mask="all_masked_row", shift=True, upstream="logps"),
    Case(3, 4, 1000, BF16, layout="transposed", mask="random", values="neginf"),
    Case(3, 4, 1000, F64, layout="transposed", mask="prompt", shift=True, weights=True),
    Case(2, 6, 1000, F64, layout="big_view", mask="random", values="extreme"),
    Case(1, 8, 513, F32, layout="drop_last", mask="prompt", shift=True, unbatched=True),
    Case(1, 8, 513, BF16, layout="big_view", mask="random", unbatched=True),
    Case(2, 3, 4097, BF16, layout="big_view", mask="random"),  # several kernel chunks
]


def _params():
    out = []
    for bp in backend_params(KERNEL_BACKENDS):
        backend, device = bp.values
        for case in CASES:
            if supports_dtype(backend, case.dtype):
                out.append(pytest.param(backend, device, case, id=f"{bp.id}-{case.id}", marks=bp.marks))
    return out


@pytest.mark.parametrize("backend,device,case", _params())
def test_inplace_gradient_lands_in_logits_storage(backend, device, case):
    require_backend(backend, device)
    fresh = make_inputs(case, device)
    inplace = make_inputs(case, device)  # same seed: same values, layout and upstream gradients
    untouched = inplace.base.detach().clone()

    expected = run_backend(case, fresh, backend, inplace_backward=False)
    got = run_backend(case, inplace, backend, inplace_backward=True)

    # forward is the same computation
    assert torch.equal(got.logps, expected.logps)
    assert torch.equal(got.num_tokens, expected.num_tokens)
    if expected.token_logps is not None:
        assert torch.equal(got.token_logps, expected.token_logps)

    view = inplace.logits.detach()
    grad = got.grad_logits[0] if case.unbatched else got.grad_logits
    fresh_grad = expected.grad_logits[0] if case.unbatched else expected.grad_logits
    # the gradient equals the fresh-buffer one, bitwise, and is the logits' own storage
    assert torch.equal(grad, fresh_grad)
    assert torch.equal(view, fresh_grad), "the logits storage does not hold the gradient"
    assert grad.data_ptr() == view.data_ptr() and grad.stride() == view.stride()
    assert fresh_grad.data_ptr() != fresh.logits.data_ptr()
    assert not torch.equal(fresh.logits.detach(), fresh_grad)  # the fresh path left its logits alone
    # the weights' gradient does not depend on where the logits gradient went
    if expected.grad_weights is not None:
        assert torch.equal(got.grad_weights, expected.grad_weights)

    # nothing outside the view changed
    outside = torch.ones(inplace.base.shape, dtype=torch.bool, device=inplace.base.device)
    inside = outside.as_strided(view.shape, view.stride(), view.storage_offset() - inplace.base.storage_offset())
    inside.fill_(False)
    assert torch.equal(inplace.base.detach()[outside], untouched[outside])
    assert outside.any() or case.layout in ("contiguous", "transposed")
    if case.layout == "offset_view":
        assert view.storage_offset() > 0


@pytest.mark.parametrize("backend,device", backend_params(KERNEL_BACKENDS))
def test_inplace_backward_needs_non_overlapping_rows(backend, device):
    """An expanded (stride 0) logits tensor cannot receive its gradient in place: a clear error
    naming the argument, before any kernel runs."""
    require_backend(backend, device)
    x = torch.randn(1, 3, 50, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (4, 3), device=device)
    with pytest.raises(ValueError, match="inplace_backward"):
        dk.sequence_logps(x.expand(4, 3, 50), labels, inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend,device", backend_params(KERNEL_BACKENDS))
def test_inplace_forward_leaves_logits_alone(backend, device):
    """Only the backward writes: after the forward (and without any backward) the logits are
    bitwise what they were."""
    require_backend(backend, device)
    x = torch.randn(2, 5, 300, device=device)
    before = x.clone()
    labels = torch.randint(0, 300, (2, 5), device=device)
    out = dk.sequence_logps(x.requires_grad_(), labels, shift=True, inplace_backward=True, backend=backend)
    assert torch.isfinite(out.logps).all()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("backend,device", backend_params(KERNEL_BACKENDS))
def test_inplace_backward_reuse_of_the_logits_is_caught_not_silent(backend, device):
    """Once the gradient overwrote the logits, autograd must refuse to use them again (the custom
    op declares the mutation, so the version counter trips) rather than compute a wrong number."""
    require_backend(backend, device)
    x0 = torch.randn(2, 5, 300, device=device)
    labels = torch.randint(0, 300, (2, 5), device=device)

    # a second backward through the same graph
    x = x0.clone().requires_grad_()
    out = dk.sequence_logps(x, labels, inplace_backward=True, backend=backend)
    torch.autograd.grad(out.logps.sum(), x, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.logps.sum(), x)

    # another op saved the logits for its own backward, which runs after ours
    leaf = x0.clone().requires_grad_()
    logits = leaf * 1
    other = (logits**2).sum()
    out = dk.sequence_logps(logits, labels, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(other + out.logps.sum(), leaf)
