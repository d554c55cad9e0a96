"""`dk.fused_dpo_loss` on policy logits against TRL 1.16's `DPOTrainer._compute_loss` fed with the
per-token log-probs of the same logits (float64 `log_softmax` + gather, as TRL's fused LM head
returns them): this checks the pipeline TRL defines around the loss math, i.e. the chosen/rejected
row split, the shift, the completion lengths of ipo/sigmoid_norm, sft's token mean, LD-DPO's
weights applied to the policy and (on TRL's non-precomputed path) to the reference, WPO
(`use_weighting`) and the metrics TRL logs from the per-token extras of its fused LM head (entropy,
logits/chosen, logits/rejected, mean_token_accuracy; fed with the float64 oracle's extras).
Loss, gradient w.r.t. the policy logits and the logged metrics agree to 1e-6 (float64, cpu backend).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")

import dpo_kernels as dk  # noqa: E402
from dpo_kernels.losses import LOSS_TYPES  # noqa: E402
from python_tests.helpers.logps import require_backend  # noqa: E402
from python_tests.helpers.trl_harness import trl_dpo_loss  # noqa: E402

B, T, V = 3, 11, 40
TOL = dict(rtol=1e-6, atol=1e-6)
EXTRA = {"exo_pair": dict(label_smoothing=0.01), "robust": dict(label_smoothing=0.2),
         "aot": dict(label_smoothing=0.1), "aot_unpaired": dict(label_smoothing=0.1)}


def make_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(T)
    prompt = torch.randint(1, 5, (2 * B,), generator=gen)
    end = torch.randint(7, T + 1, (2 * B,), generator=gen)
    completion_mask = ((idx >= prompt[:, None]) & (idx < end[:, None])).long()
    input_ids = torch.randint(0, V, (2 * B, T), generator=gen)
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    logits = torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64) * 2
    ref_logits = logits + torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)
    ref = -torch.rand(2 * B, generator=gen, dtype=torch.float64) * 30
    return completion_mask, labels, logits, ref_logits, ref[:B], ref[B:]


def trl_token_logps(logits, labels):
    # TRL's fused LM head: [2B, T - 1] log-probs of labels[:, 1:], 0 (no gradient) where masked
    return dk.reference.token_logps(logits, labels, shift=True, compute_dtype=torch.float64)[:, :-1]


def trl_token_extras(logits, labels):
    # the per-token extras of TRL's fused LM head, aligned like trl_token_logps (detached: TRL only
    # logs them, and weighs by log_sum_sq_probs without a gradient)
    extras = dk.reference.token_extras(logits.detach(), labels, shift=True, compute_dtype=torch.float64)
    return {name: value[:, :-1] for name, value in extras.items()}


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def compare(seed, *, reference, ld_alpha, **options):
    require_backend("cpu", "cpu")
    completion_mask, labels, logits, ref_logits, ref_c, ref_r = make_inputs(seed)
    x_trl = logits.clone().requires_grad_()
    our_ref_kwargs = (dict(ref_logits=ref_logits) if reference == "model"
                      else dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r))
    trl_ref_kwargs = (dict(ref_token_logps=trl_token_logps(ref_logits, labels)) if reference == "model"
                  else dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_loss, trl_metrics = trl_dpo_loss(trl_token_logps(x_trl, labels), completion_mask, ld_alpha=ld_alpha,
                                             extras=trl_token_extras(x_trl, labels), **trl_ref_kwargs, **options)
    if options.get("use_weighting") and "hinge" in options["loss_type"]:
        # TRL 1.16 multiplies its relu output in place by the WPO weights, so its backward fails;
        # the gradient is then checked against the plain-PyTorch backend (float64 autograd)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(trl_loss, [x_trl])
        x_ref = logits.clone().requires_grad_()
        ref_out = dk.fused_dpo_loss(x_ref, labels, shift=True, backend="reference", ld_alpha=ld_alpha,
                                    **our_ref_kwargs, **options)
        torch.testing.assert_close(ref_out.loss.detach(), trl_loss.detach(), **TOL)
        (trl_grad,) = torch.autograd.grad(ref_out.loss, [x_ref])
    else:
        (trl_grad,) = torch.autograd.grad(trl_loss, [x_trl])

    x = logits.clone().requires_grad_()
    out = dk.fused_dpo_loss(x, labels, shift=True, backend="cpu", ld_alpha=ld_alpha, **our_ref_kwargs, **options)
    (grad,) = torch.autograd.grad(out.loss, [x])
    torch.testing.assert_close(out.loss.detach(), trl_loss.detach(), **TOL)
    assert trl_grad.abs().max() > 0
    torch.testing.assert_close(grad, trl_grad, **TOL)
    metrics = out.metrics
    for name in METRICS:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_with_ld_dpo_and_reference_model(loss_type):
    compare(LOSS_TYPES.index(loss_type), reference="model", ld_alpha=0.5, loss_type=[loss_type],
            **EXTRA.get(loss_type, {}))


# WPO is refused with the sorting loss types (as TRL), and TRL 1.16 cannot run it with sft (it
# multiplies its expanded sft loss in place; see test_fused_linear_dpo_loss.py)
WPO_LOSS_TYPES = [t for t in LOSS_TYPES if t not in ("aot", "aot_unpaired", "sft")]


@pytest.mark.parametrize("loss_type", WPO_LOSS_TYPES)
def test_each_loss_type_with_wpo(loss_type):
    compare(50 + LOSS_TYPES.index(loss_type), reference="precomputed", ld_alpha=None, loss_type=[loss_type],
            use_weighting=True, **EXTRA.get(loss_type, {}))


@pytest.mark.parametrize("options", [
    dict(reference="precomputed", ld_alpha=None, loss_type=["sigmoid"]),
    dict(reference="model", ld_alpha=None, loss_type=["sigmoid_norm", "sft", "bco_pair"], loss_weights=[1.0, 0.2, 0.5]),
    dict(reference="precomputed", ld_alpha=0.3, loss_type=["ipo", "sft"]),
    dict(reference="model", ld_alpha=0.0, loss_type=["aot", "apo_down", "sft"], label_smoothing=0.05),
    dict(reference="precomputed", ld_alpha=0.7, loss_type=["hinge", "sft"], f_divergence_type="js_divergence"),
    dict(reference="model", ld_alpha=1.0, loss_type=["robust", "discopop"], label_smoothing=0.3,
         f_divergence_type="forward_kl", discopop_tau=0.3, beta=0.4),
    dict(reference="precomputed", ld_alpha=None, loss_type=["sigmoid"], use_weighting=True),
    dict(reference="model", ld_alpha=0.5, loss_type=["ipo", "bco_pair"], loss_weights=[1.0, 0.5], use_weighting=True),
    dict(reference="model", ld_alpha=None, loss_type=["apo_zero", "nca_pair"], use_weighting=True, beta=0.3),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_option_combinations(options):
    compare(99, **options)
