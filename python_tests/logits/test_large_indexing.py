"""64-bit indexing (docs/design.md, section 5): logits with more than 2**31 elements on the CPU backend.

`[2, 8400, 128256]` bf16 logits (Llama-3's vocabulary) hold 2.15e9 elements, 4.3 GB. Most rows are
zero (cheap to fill: a memset, no fp32 temporary); the last rows, whose element offsets pass
2**31, hold random values and are checked, forward and gradient, against the float64 reference
run on just those rows. A kernel that wrapped its offsets at 32 bits would read (or write) the
zero rows, or memory before the tensor, instead. The backward is in place, so no second 4.3 GB
buffer exists. Zero rows are checked too, against their closed form (log-prob -log V, gradient
g * (onehot - 1 / V)), on a sample.
"""

from __future__ import annotations

import math

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.logps import ACC_ROUNDINGS, element_magnitude, require_backend, tolerance

S, T, V = 2, 8400, 128256
N = S * T
CHECKED = 96  # the last CHECKED rows are random and compared with the reference
FILL_ROWS = 256  # rows filled per step


@pytest.mark.slow
def test_more_than_2_pow_31_elements_bf16_cpu():
    require_backend("cpu", "cpu")
    assert N * V > 2**31
    dtype = torch.bfloat16
    tol = tolerance(dtype, "cpu")
    gen = torch.Generator().manual_seed(0)

    logits = torch.empty(S, T, V, dtype=dtype)
    flat = logits.view(N, V)
    first_checked = N - CHECKED
    for r0 in range(0, first_checked, FILL_ROWS * 16):
        flat[r0:min(r0 + FILL_ROWS * 16, first_checked)].zero_()
    for r0 in range(first_checked, N, FILL_ROWS):
        r1 = min(r0 + FILL_ROWS, N)
        flat[r0:r1] = (torch.randn(r1 - r0, V, generator=gen) * 3).to(dtype)
    # the checked rows straddle and pass the 2**31 element offset
    offsets = torch.arange(first_checked, N, dtype=torch.int64) * V
    assert offsets[0] < 2**31 < offsets[-1] and int((offsets >= 2**31).sum()) >= 32

    labels = torch.randint(0, V, (S, T), generator=gen)
    labels[torch.rand(S, T, generator=gen) < 0.05] = -100
    labels.view(N)[-3] = -100  # a masked row among the checked ones
    grad_logps = torch.randn(S, generator=gen)
    grad_token = torch.randn(S, T, generator=gen)

    checked64 = flat[first_checked:].to(torch.float64)  # the reference's input: these rows only
    logits.requires_grad_()
    out = dk.sequence_logps(logits, labels, return_token_logps=True, inplace_backward=True, backend="cpu")

    targets = labels.view(N)
    valid = targets != -100
    ref_checked = dk.reference.token_logps(
        checked64[None], targets[first_checked:][None], compute_dtype=torch.float64
    )[0]
    mag_el = element_magnitude(checked64)
    mag = mag_el.gather(1, targets[first_checked:].clamp(min=0)[:, None]).squeeze(1)
    token = out.token_logps.detach().view(N)

    # forward, checked rows: the float64 reference within fp32 accumulation error
    err = (token[first_checked:].double() - ref_checked).abs()
    bound = tol.rtol * ref_checked.abs() + ACC_ROUNDINGS * tol.eps * mag
    assert (err <= bound).all(), f"checked rows: max error/bound {float((err / bound).max()):.3g}"
    # forward, zero rows: -log V
    zero_rows = torch.zeros(N, dtype=torch.bool)
    zero_rows[:first_checked] = True
    log_v = math.log(V)
    zero_bound = tol.rtol * log_v + ACC_ROUNDINGS * tol.eps * (log_v + 1)
    zero_err = (token[zero_rows & valid].double() + log_v).abs()
    assert (zero_err <= zero_bound).all(), float(zero_err.max())
    assert (token[~valid] == 0).all()
    # per-sequence sums: all of sequence 0 and most of sequence 1 are zero rows
    expected_token = torch.where(valid, torch.full((N,), -log_v, dtype=torch.float64), torch.zeros(N, dtype=torch.float64))
    expected_token[first_checked:] = ref_checked
    expected_logps = expected_token.view(S, T).sum(1)
    sum_bound = (valid.view(S, T).sum(1) * zero_bound + (T + 2) * tol.eps * expected_token.abs().view(S, T).sum(1)
                 + bound.sum())
    assert ((out.logps.double() - expected_logps).abs() <= sum_bound).all()
    assert torch.equal(out.num_tokens, valid.view(S, T).sum(1))

    loss = (out.logps * grad_logps).sum() + (out.token_logps * grad_token).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.data_ptr() == logits.data_ptr()  # in place: the 4.3 GB storage holds the gradient
    grad_flat = grad.view(N, V)

    # upstream gradient of each token log-prob, d loss / d token_logps[s, t], and the magnitude of
    # its two terms (autograd adds them in fp32: see logps_testing.upstream_per_position)
    g_all = (grad_logps.double()[:, None] + grad_token.double()).view(N)
    g_all = torch.where(valid, g_all, torch.zeros_like(g_all))
    g_mag = (grad_logps.double().abs()[:, None] + grad_token.double().abs()).view(N)
    g_mag = torch.where(valid, g_mag, torch.zeros_like(g_mag))

    # gradient, checked rows: g * (onehot - softmax), rounded once to bf16
    g = g_mag[first_checked:, None]
    p = torch.softmax(checked64, dim=-1)
    tgt = targets[first_checked:].clamp(min=0)
    onehot = torch.zeros_like(p).scatter_(1, tgt[:, None], 1.0)
    expected = g_all[first_checked:, None] * (onehot - p)
    got = grad_flat[first_checked:].double()
    gbound = (tol.rtol + tol.round_u) * expected.abs() + ACC_ROUNDINGS * tol.eps * g * (mag_el * p + onehot) \
        + 2.0**-120 * g + tol.floor
    assert ((got - expected).abs() <= gbound).all(), f"max error/bound {float(((got - expected).abs() / gbound).max()):.3g}"
    assert (grad_flat[N - 3] == 0).all()

    # gradient, a sample of zero rows (the first, the last, and every 97th)
    sample = torch.cat([torch.arange(0, first_checked, 97), torch.tensor([first_checked - 1])])
    gs, gm = g_all[sample, None], g_mag[sample, None]
    onehot = torch.zeros(len(sample), V, dtype=torch.float64).scatter_(1, targets[sample].clamp(min=0)[:, None], 1.0)
    expected = gs * (onehot - 1.0 / V)
    got = grad_flat[sample].double()
    zbound = (tol.rtol + tol.round_u) * expected.abs() + ACC_ROUNDINGS * tol.eps * gm * ((log_v + 1) / V + onehot) \
        + 2.0**-120 * gm + tol.floor
    assert ((got - expected).abs() <= zbound).all()
