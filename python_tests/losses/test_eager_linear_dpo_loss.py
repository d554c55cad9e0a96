"""`fused_linear_dpo_loss(..., eager_backward=True)`: gradients computed in forward, a block of pairs
at a time, equal to the default path's and to the full-logits float64 oracle."""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.losses.eager_linear_dpo_loss import pair_blocks

B, T, H, V = 3, 12, 16, 97


def _inputs(dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype).requires_grad_()
    bias_t = torch.randn(V, generator=gen).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :4] = -100
    labels[B + 1, :] = -100  # a rejected row with nothing scored
    ref = torch.randn(2, B, generator=gen).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return hidden, weight, bias_t, labels, ref


def _run(inputs, eager, **options):
    hidden, weight, bias, labels, ref = inputs
    out = dk.fused_linear_dpo_loss(hidden, weight, labels, bias, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                                   shift=True, eager_backward=eager, **options)
    params = [t for t in (hidden, weight, bias) if t is not None]
    return out, torch.autograd.grad(out.loss * 3.0, params)  # an upstream gradient other than 1


def _oracle(inputs, **options):
    """The loss from full float64 logits through dk.reference, and its gradients."""
    hidden, weight, bias, labels, ref = (t.detach().double().requires_grad_() if t is not None and t.is_floating_point()
                                         else t for t in inputs)
    logits = hidden @ weight.T + bias
    scale, cap = options.pop("logit_scale", 1.0), options.pop("softcap", None)
    logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    out = dk.fused_dpo_loss(logits, labels, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], shift=True,
                            backend="reference", **options)
    return out, torch.autograd.grad(out.loss * 3.0, (hidden, weight, bias))


OPTIONS = [
    dict(beta=0.1),
    dict(beta=0.2, loss_type=["ipo", "hinge"], loss_weights=[1.0, 0.5], ld_alpha=0.5),
    dict(beta=0.1, loss_type="robust", label_smoothing=0.1, softcap=2.0, logit_scale=0.7),
    dict(beta=0.1, loss_type=["exo_pair", "apo_zero", "bco_pair", "sppo_hard"], label_smoothing=1e-3),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("block_bytes", [0, 2 * T * V * 8, 1 << 40])  # one pair, two pairs, the whole batch
def test_float64_equals_the_default_path_and_the_oracle(options, block_bytes):
    inputs = _inputs(torch.float64)
    default, default_grads = _run(inputs, False, backend="cpu", **options)
    eager, eager_grads = _run(inputs, True, backend="cpu", cache_budget_bytes=block_bytes, **options)
    oracle, oracle_grads = _oracle(inputs, **options)
    assert eager.loss.item() == pytest.approx(default.loss.item(), rel=1e-12)
    assert eager.loss.item() == pytest.approx(oracle.loss.item(), rel=1e-10)
    for name in ("losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(eager, name), getattr(default, name).detach(), rtol=1e-12, atol=1e-12)
    assert eager.metrics.keys() == default.metrics.keys()
    for key, value in default.metrics.items():
        assert eager.metrics[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    for got, want, oracle_grad in zip(eager_grads, default_grads, oracle_grads):
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-12 * scale
        assert (got - oracle_grad).abs().max().item() <= 1e-10 * scale


def test_reference_free_with_pair_weights_equals_the_default_path():
    """No reference log-probs at all (reference_free=True, SimPO-style) and per-pair weights, which
    the blocks slice."""
    hidden, weight, bias, labels, _ = _inputs(torch.float64)
    options = dict(reference_free=True, loss_type="sigmoid_norm", simpo_gamma=0.5, beta=2.0, shift=True,
                   backend="cpu", pair_weights=torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64))
    results = []
    for eager in (False, True):
        out = dk.fused_linear_dpo_loss(hidden, weight, labels, bias, eager_backward=eager,
                                       cache_budget_bytes=2 * T * V * 8, **options)
        results.append((out, torch.autograd.grad(out.loss, (hidden, weight, bias))))
    (default, default_grads), (eager, eager_grads) = results
    torch.testing.assert_close(eager.losses, default.losses.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(eager_grads, default_grads):
        assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float32_and_wpo(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = _inputs(torch.float32)
    options = dict(beta=0.1, use_weighting=True, backend=backend)
    default, default_grads = _run(inputs, False, **options)
    eager, eager_grads = _run(inputs, True, **options)
    assert eager.loss.item() == pytest.approx(default.loss.item(), rel=1e-6)
    for got, want in zip(eager_grads, default_grads):
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_bfloat16_within_its_rounding():
    inputs = _inputs(torch.bfloat16, bias=False)
    default, default_grads = _run(inputs, False, beta=0.1)
    eager, eager_grads = _run(inputs, True, beta=0.1)
    assert eager.loss.item() == pytest.approx(default.loss.item(), rel=1e-5)
    for got, want in zip(eager_grads, default_grads):  # dweight: one bf16 rounding per pair block
        assert (got.float() - want.float()).abs().max().item() <= 2.0 ** -7 * want.float().abs().max().item()


def test_only_the_loss_is_differentiable_and_partial_requires_grad():
    hidden, weight, bias, labels, ref = _inputs(torch.float64)
    weight.requires_grad_(False)
    out = dk.fused_linear_dpo_loss(hidden, weight, labels, bias, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                                   eager_backward=True, beta=0.1)
    assert not out.chosen_logps.requires_grad and out.loss.requires_grad
    out.loss.backward()
    assert hidden.grad is not None and bias.grad is not None and weight.grad is None
    # without gradients wanted it is the plain path
    with torch.no_grad():
        plain = dk.fused_linear_dpo_loss(hidden, weight, labels, bias, ref_chosen_logps=ref[0],
                                         ref_rejected_logps=ref[1], eager_backward=True, beta=0.1)
    assert plain.loss.item() == pytest.approx(out.loss.item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", "sft", ["sigmoid", "sft"]])
def test_loss_types_that_couple_pairs_are_refused(loss_type):
    hidden, weight, bias, labels, ref = _inputs(torch.float32)
    with pytest.raises(ValueError, match="eager_backward=True needs loss types"):
        dk.fused_linear_dpo_loss(hidden, weight, labels, bias, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                                 eager_backward=True, loss_type=loss_type)
    with pytest.raises(TypeError, match="eager_backward must be a bool"):
        dk.fused_linear_dpo_loss(hidden, weight, labels, bias, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                                 eager_backward=1)


def test_pair_blocks():
    assert pair_blocks([3, 3, 3], bytes_per_token=10, block_bytes=0) == [(0, 1), (1, 2), (2, 3)]
    assert pair_blocks([3, 3, 3], bytes_per_token=10, block_bytes=60) == [(0, 2), (2, 3)]
    assert pair_blocks([9, 1, 1], bytes_per_token=10, block_bytes=50) == [(0, 1), (1, 3)]
    assert pair_blocks([2], bytes_per_token=10, block_bytes=0) == [(0, 1)]


def test_module_takes_the_option():
    hidden, weight, bias, labels, ref = _inputs(torch.float64)
    module = dk.FusedLinearDPOLoss(beta=0.1, eager_backward=True)
    out = module(hidden, weight, labels, bias, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    plain = dk.fused_linear_dpo_loss(hidden, weight, labels, bias, ref_chosen_logps=ref[0],
                                     ref_rejected_logps=ref[1], beta=0.1)
    assert not out.chosen_logps.requires_grad  # the eager path ran
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-12)
    with pytest.raises(TypeError, match="eager_backward must be a bool"):
        dk.FusedLinearDPOLoss(eager_backward="yes")
