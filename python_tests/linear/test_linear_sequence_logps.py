"""`dk.linear_sequence_logps` of every backend against the float64 reference (full logits from
`hidden @ weight.T`, then the reference log-probs): forward, every gradient, every extra, the logit
transforms, bias, shift, masks, chunk sizes that do not divide V, dtypes, autocast, the tile cache
and `requires_grad` on only some inputs. Bounds: python_tests/helpers/linear.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.linear import (
    EXTRA_NAMES,
    LinearCase,
    assert_within,
    make_linear_inputs,
    run_linear_backend,
    run_linear_reference,
    unit_error,
)
from python_tests.helpers.logps import KERNEL_BACKENDS, backend_params, require_backend, supports_dtype

ALL_EXTRAS = EXTRA_NAMES

CASES = [
    LinearCase(),
    LinearCase(bias=True, shift=True, weights=True),
    LinearCase(average=True, mask="all_masked_row", extras=ALL_EXTRAS),
    LinearCase(temperature=0.7, logit_scale=1.6, softcap=3.0, bias=True, extras=ALL_EXTRAS, entropy_grad=True),
    LinearCase(chunk_size=None, V=301, H=40, extras=("entropy",), entropy_grad=True, shift=True),
    LinearCase(chunk_size=7, V=50, cache=True, bias=True, weights=True, average=True),
    LinearCase(chunk_size=128, V=100),  # one chunk wider than V
    LinearCase(S=1, T=9, unbatched=True, shift=True, extras=("log_sum_sq_probs", "is_top1")),
    LinearCase(grad_on=("hidden",), bias=True),
    LinearCase(grad_on=("weight", "bias"), bias=True, softcap=2.0),
    LinearCase(grad_on=(), weights=True),
    LinearCase(dtype=torch.bfloat16, bias=True, shift=True, extras=ALL_EXTRAS, entropy_grad=True, softcap=4.0),
    LinearCase(dtype=torch.bfloat16, cache=True, chunk_size=24, weights=True),
    LinearCase(dtype=torch.float16, average=True),
    LinearCase(dtype=torch.float64, bias=True, shift=True, weights=True, extras=ALL_EXTRAS, entropy_grad=True,
               temperature=1.3, logit_scale=0.8, softcap=2.5),
    LinearCase(dtype=torch.float64, chunk_size=9, cache=True, mask="all_masked_row", average=True),
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_float64_reference(backend, device, case):
    require_backend(backend, device)
    if not supports_dtype(backend, case.dtype):
        pytest.skip(f"float64 is not a dtype of backend {backend!r}")
    inputs = make_linear_inputs(case, device)
    out, grads = run_linear_backend(case, inputs, backend)
    ref, ref_grads, mags, ref_extras, E = run_linear_reference(case, inputs)
    dtype = case.dtype
    labels = inputs.labels if inputs.labels.dim() == 2 else inputs.labels[None]
    targets = dk.reference.shift_labels(labels) if case.shift else labels
    num_tokens = (targets != -100).sum(-1)
    assert torch.equal(out.num_tokens.cpu().reshape(-1), num_tokens.cpu())
    assert_within("logps", out.logps, ref.logps, mags["logps"], dtype)
    assert_within("token_logps", out.token_logps, ref.token_logps, mags["token_logps"], dtype)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_within(f"grad {name}", grad, ref_grads[name], mags[name], dtype)
    for extra in EXTRA_NAMES:
        got = getattr(out, extra)
        requested = extra in case.extras or (extra == "entropy" and case.entropy_grad)
        if not requested:
            assert got is None, extra
            continue
        assert got.shape == labels.shape[(1 if case.unbatched else 0):], extra
        expected = getattr(ref_extras, extra)
        if extra == "is_top1":
            _check_top1(got, expected, inputs, case)
            continue
        mag = mags["entropy"] if extra == "entropy" else E
        assert_within(extra, got, expected, mag.reshape(expected.shape), dtype)


def _check_top1(got, expected, inputs, case):
    """Equal wherever the reference's two largest logits differ by more than the logits' error."""
    h = inputs.hidden.detach().double().cpu()
    w = inputs.weight.detach().double().cpu()
    z = h @ w.T + (0 if inputs.bias is None else inputs.bias.detach().double().cpu())
    top2 = z.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]) * case.logit_scale
    decided = gap > 1e-3 * (1 + z.abs().amax(-1))
    got, expected = got.cpu(), expected.cpu()
    assert got.dtype == torch.bool
    assert torch.equal(got[decided], expected[decided])
    assert decided.float().mean() > 0.8  # the check covers most tokens


@pytest.mark.parametrize("backend,device", backend_params(KERNEL_BACKENDS))
def test_autocast_computes_in_the_autocast_dtype(backend, device):
    """fp32 inputs under autocast(bf16): the GEMMs run in bf16 (as the model's own lm_head would),
    gradients come back fp32, and the result matches the reference on the bf16-rounded inputs."""
    require_backend(backend, device)
    case = LinearCase(dtype=torch.float32, bias=True, shift=True, extras=("entropy",), entropy_grad=True)
    inputs = make_linear_inputs(case, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, grads = run_linear_backend(case, inputs, backend)
    assert out.logps.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    rounded = dataclasses.replace(case, dtype=torch.bfloat16)
    bf16_inputs = dataclasses.replace(
        inputs, hidden=inputs.hidden.detach().to(torch.bfloat16).requires_grad_(),
        weight=inputs.weight.detach().to(torch.bfloat16).requires_grad_(),
        bias=inputs.bias.detach().to(torch.bfloat16).requires_grad_())
    ref, ref_grads, mags, _, _ = run_linear_reference(rounded, bf16_inputs)
    assert_within("logps", out.logps, ref.logps, mags["logps"], torch.bfloat16)
    for name, grad in grads.items():
        # fp32 gradients: no final rounding to bf16, but bf16 tiles and operands inside
        assert_within(f"grad {name}", grad, ref_grads[name], mags[name], torch.bfloat16)
    # and it differs from the fp32 computation by more than fp32 error: bf16 really was used
    fp32_out, _ = run_linear_backend(case, make_linear_inputs(case, device), backend)
    assert (out.logps - fp32_out.logps).abs().max() > 100 * unit_error(torch.float32)


@pytest.mark.parametrize("backend,device", backend_params(KERNEL_BACKENDS))
def test_cache_and_chunk_size_do_not_change_results(backend, device):
    """Cached tiles, recomputed tiles and any chunk size give the same numbers up to fp32 rounding
    of the GEMM splits (identical GEMM rows: each logit is computed the same way)."""
    require_backend(backend, device)
    case = LinearCase(V=97, bias=True, extras=("entropy", "log_sum_sq_probs"), entropy_grad=True)
    results = []
    for chunk, cache in ((16, False), (16, True), (97, False), (40, True)):
        inputs = make_linear_inputs(case, device)
        out, grads = run_linear_backend(dataclasses.replace(case, chunk_size=chunk, cache=cache), inputs, backend)
        results.append((out, grads))
    base_out, base_grads = results[0]
    for out, grads in results[1:]:
        torch.testing.assert_close(out.logps, base_out.logps, rtol=1e-5, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads[name], base_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params(KERNEL_BACKENDS))
def test_second_backward_with_retain_graph_recomputes(backend, device):
    """The cached tiles are consumed by the first backward; a second one (retain_graph) recomputes."""
    require_backend(backend, device)
    case = LinearCase(cache=True)
    inputs = make_linear_inputs(case, device)
    out = dk.linear_sequence_logps(inputs.hidden, inputs.weight, inputs.labels, chunk_size=16,
                                   cache_budget_bytes=1 << 30, backend=backend)
    loss = out.logps.sum()
    first = torch.autograd.grad(loss, inputs.hidden, retain_graph=True)[0]
    second = torch.autograd.grad(loss, inputs.hidden)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_bad_arguments_raise_before_any_kernel():
    h = torch.randn(2, 3, 8)
    w = torch.randn(10, 8)
    labels = torch.randint(0, 10, (2, 3))
    call = dk.linear_sequence_logps
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        call(h, torch.randn(10, 7), labels)
    with pytest.raises(ValueError, match="bias must be \\[V\\]"):
        call(h, w, labels, torch.randn(9))
    with pytest.raises(ValueError, match="labels must have shape"):
        call(h, w, labels[:, :2])
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        call(h, w, labels.clone().fill_(10))
    with pytest.raises(ValueError, match="temperature must be a positive"):
        call(h, w, labels, temperature=0.0)
    with pytest.raises(ValueError, match="softcap must be a positive"):
        call(h, w, labels, softcap=-1.0)
    with pytest.raises(ValueError, match="logit_scale must be a positive"):
        call(h, w, labels, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="extras must be names"):
        call(h, w, labels, extras=("entropy", "perplexity"))
    with pytest.raises(TypeError, match="extras must be a sequence"):
        call(h, w, labels, extras="entropy")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        call(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match="cache_budget_bytes must be >= 0"):
        call(h, w, labels, cache_budget_bytes=-1)
    with pytest.raises(TypeError, match="same dtype outside autocast"):
        call(h, w.double(), labels)
    with pytest.raises(ValueError, match="hidden must be 2-D or 3-D"):
        call(h[0, 0], w, labels)
    with pytest.raises(ValueError, match="vocabulary"):
        call(h, torch.randn(0, 8), labels)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        call(h.int(), w.int(), labels)
