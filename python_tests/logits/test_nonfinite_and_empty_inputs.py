"""Inputs at the edges of the domain: NaN in the logits, garbage (NaN, +-inf) at masked positions,
and empty batches."""

from __future__ import annotations

import math

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.logps import KERNEL_BACKENDS, backend_params, require_backend


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("nan_at", [0, 137, 299], ids=lambda v: f"nan_at{v}")
def test_nan_in_an_unmasked_row_propagates_and_stays_in_its_row(backend, device, nan_at):
    """A NaN logit makes its own row's log-prob (and its sequence's sum and its row's gradient)
    NaN: never a silently finite number. Other rows are not affected."""
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(nan_at)
    x = torch.randn(2, 3, 300, generator=gen)
    labels = torch.randint(0, 300, (2, 3), generator=gen)
    x[0, 1, nan_at] = math.nan
    x = x.to(device).requires_grad_()
    out = dk.sequence_logps(x, labels.to(device), return_token_logps=True, backend=backend)
    nan_rows = torch.zeros(2, 3, dtype=torch.bool, device=device)
    nan_rows[0, 1] = True
    assert torch.equal(out.token_logps.isnan(), nan_rows)
    assert out.logps.isnan().tolist() == [True, False]
    (grad,) = torch.autograd.grad(out.token_logps[nan_rows.logical_not()].sum(), x, retain_graph=True)
    assert torch.isfinite(grad[~nan_rows]).all()  # no NaN leaks into other rows' gradients
    (grad,) = torch.autograd.grad(out.token_logps[0, 1], x)
    assert grad[0, 1].isnan().any() and torch.equal(grad[1], torch.zeros_like(grad[1]))


@pytest.mark.parametrize("backend,device", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_masked_positions_are_never_read(backend, device, garbage):
    """Positions whose label is ignore_index are excluded everywhere (docs/design.md, section 3): whatever
    their logits hold (padding positions after an fp16 overflow, say), they contribute 0 to the
    forward and receive an exactly zero gradient, and nothing else changes.

    (The "reference" backend, the unfused PyTorch computation, is exempt: log_softmax of a row
    that is all NaN or inf gives NaN, and its backward turns that into a NaN gradient even at a
    masked position.)"""
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 4, 300, generator=gen)
    labels = torch.randint(0, 300, (2, 4), generator=gen)
    labels[0, 2] = -100
    labels[1, 0] = -100
    dirty = clean.clone()
    dirty[0, 2] = garbage
    dirty[1, 0, ::3] = garbage
    results = []
    for x in (clean, dirty):
        x = x.to(device).requires_grad_()
        out = dk.sequence_logps(x, labels.to(device), return_token_logps=True, average=True, backend=backend)
        g_tok = torch.randn(2, 4, generator=torch.Generator().manual_seed(2)).to(device)
        (grad,) = torch.autograd.grad(out.logps.sum() + (out.token_logps * g_tok).sum(), x)
        results.append((out.logps, out.token_logps, grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    grad = results[1][2]
    assert torch.equal(grad[0, 2], torch.zeros_like(grad[0, 2]))
    assert torch.equal(grad[1, 0], torch.zeros_like(grad[1, 0]))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape", [(0, 4, 10), (3, 0, 10), (0, 10)], ids=["S0", "T0", "N0"])
def test_empty_batches(backend, device, shape):
    require_backend(backend, device)
    x = torch.randn(shape, device=device, requires_grad=True)
    labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    out = dk.sequence_logps(x, labels, return_token_logps=True, shift=True, backend=backend)
    S = 1 if len(shape) == 2 else shape[0]
    assert out.logps.shape == (S,) and out.num_tokens.shape == (S,)
    assert torch.equal(out.logps, torch.zeros(S, device=device))
    assert torch.equal(out.num_tokens, torch.zeros(S, dtype=torch.long, device=device))
    assert out.token_logps.shape == shape[:-1]
    (grad,) = torch.autograd.grad(out.logps.sum() + out.token_logps.sum(), x)
    assert grad.shape == x.shape
