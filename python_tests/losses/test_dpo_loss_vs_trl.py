"""`dk.dpo_loss` against TRL 1.16's real `DPOTrainer._compute_loss` (see python_tests/helpers/trl_harness.py).

Random per-token log-probs go through TRL's loss code and through `dk.dpo_loss` (on their sums,
as the fused calls give them); the losses, the gradients with respect to the per-token
log-probs and to the reference log-probs, and the logged metrics must agree to 1e-6 in float64
(the arithmetic differs only in its order, so the actual differences are ~1e-15).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("trl")

import dpo_kernels as dk  # noqa: E402
from dpo_kernels.losses import F_DIVERGENCE_LOSS_TYPES, LOSS_TYPES, dpo_metric_tensors  # noqa: E402
from python_tests.helpers.trl_harness import trl_dpo_loss  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-6)
B, T = 6, 12


class Batch(NamedTuple):
    token_logps: torch.Tensor  # [2B, T - 1], 0 where masked
    completion_mask: torch.Tensor  # [2B, T]
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def make_batch(seed: int, dtype=torch.float64, ratio_scale: float = 4.0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(T)
    prompt = torch.randint(1, T // 2, (2 * B,), generator=gen)  # >= 1: position 0 is never completion
    end = torch.randint(T - 3, T + 1, (2 * B,), generator=gen)  # right padding
    completion_mask = ((idx >= prompt[:, None]) & (idx < end[:, None])).long()
    shift_mask = completion_mask[:, 1:].bool()
    token_logps = -torch.rand(2 * B, T - 1, generator=gen, dtype=torch.float64) * 4
    token_logps = token_logps.masked_fill(~shift_mask, 0).to(dtype)
    sums = token_logps.sum(1)
    ref = sums + torch.randn(2 * B, generator=gen, dtype=torch.float64).to(dtype) * ratio_scale
    return Batch(token_logps, completion_mask, ref[:B].clone(), ref[B:].clone())


class Leaves(NamedTuple):
    token_logps: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def leaves(batch: Batch) -> Leaves:
    return Leaves(*(t.clone().requires_grad_() for t in (batch.token_logps, batch.ref_chosen, batch.ref_rejected)))


def masked(leaf: torch.Tensor, batch: Batch) -> torch.Tensor:
    # what TRL's LM head returns: 0, with no gradient, at masked positions
    return leaf.masked_fill(batch.completion_mask[:, 1:] == 0, 0)


def grads_of(loss, inputs):
    """Gradients, zeros for inputs the loss does not use (sft alone ignores the reference)."""
    grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def run_trl(batch: Batch, **options):
    lv = leaves(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, metrics = trl_dpo_loss(masked(lv.token_logps, batch), batch.completion_mask,
                                     ref_chosen_logps=lv.ref_chosen, ref_rejected_logps=lv.ref_rejected, **options)
    grads = grads_of(loss, lv)
    return loss.detach(), grads, metrics


def run_dk(batch: Batch, chosen_nll_mode: str = "counts", **options):
    lv = leaves(batch)
    logps = masked(lv.token_logps, batch).sum(1)
    counts = batch.completion_mask[:, 1:].sum(1)
    chosen_nll = None
    if chosen_nll_mode == "explicit":
        chosen_nll = -logps[:B].sum() / counts[:B].sum()
    out = dk.dpo_loss(logps[:B], logps[B:], lv.ref_chosen, lv.ref_rejected,
                      chosen_num_tokens=counts[:B], rejected_num_tokens=counts[B:], chosen_nll=chosen_nll,
                      **options)
    grads = grads_of(out.loss, lv)
    metrics = {k: v.item() for k, v in dpo_metric_tensors(logps[:B], logps[B:], out.chosen_rewards,
                                                          out.rejected_rewards, out.nll_loss).items()}
    return out, grads, metrics


def assert_matches_trl(batch: Batch, tol=TOL, chosen_nll_mode: str = "counts", **options):
    trl_loss, trl_grads, trl_metrics = run_trl(batch, **options)
    dk_options = dict(options)
    dk_options["loss_type"] = list(options.get("loss_type", ["sigmoid"]))
    out, grads, metrics = run_dk(batch, chosen_nll_mode, **dk_options)
    assert out.loss.dtype == trl_loss.dtype
    torch.testing.assert_close(out.loss.detach(), trl_loss, **tol)
    assert torch.isfinite(trl_loss)
    for name, g, g_trl in zip(("token_logps", "ref_chosen_logps", "ref_rejected_logps"), grads, trl_grads):
        torch.testing.assert_close(g, g_trl, **tol, msg=lambda m: f"gradient wrt {name}: {m}")
    # the loss is the mean of `losses`
    torch.testing.assert_close(out.losses.mean(), out.loss.detach(), rtol=1e-12, atol=1e-12)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=tol["rtol"], abs=tol["atol"]), name
    return out, trl_loss


# one case per loss type with its default options, then the option values TRL reads
BASE_CASES = [dict(loss_type=[t]) for t in LOSS_TYPES]
for case in BASE_CASES:
    if case["loss_type"] == ["exo_pair"]:
        case["label_smoothing"] = 1e-3  # EXO's recommended value; TRL refuses 0
OPTION_CASES = [
    dict(loss_type=["sigmoid"], label_smoothing=0.3),  # TRL's sigmoid ignores label_smoothing
    dict(loss_type=["sigmoid"], beta=0.5),
    dict(loss_type=["exo_pair"], label_smoothing=0.25, beta=0.3),
    dict(loss_type=["robust"], label_smoothing=0.1),
    dict(loss_type=["robust"], label_smoothing=0.45),
    dict(loss_type=["aot"], label_smoothing=0.2),
    dict(loss_type=["aot_unpaired"], label_smoothing=0.2),
    dict(loss_type=["hinge"], beta=0.5),
    dict(loss_type=["ipo"], beta=0.5),
    dict(loss_type=["sppo_hard"], beta=0.5),
    dict(loss_type=["discopop"], discopop_tau=0.5),
    dict(loss_type=["apo_zero"], beta=0.05),
    dict(loss_type=["apo_down"], beta=0.05),
    dict(loss_type=["nca_pair"], beta=0.3),
    dict(loss_type=["bco_pair"], beta=0.3),
    dict(loss_type=["sigmoid_norm"], beta=2.0),
]
MULTI_CASES = [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type=["ipo", "sigmoid_norm"]),
    dict(loss_type=["hinge", "apo_down", "aot_unpaired", "nca_pair"], loss_weights=[0.5, 1.5, 2.0, 0.25]),
    dict(loss_type=["exo_pair", "robust", "aot"], loss_weights=[1.0, 0.5, -0.25], label_smoothing=0.1),
    dict(loss_type=["discopop", "sppo_hard", "apo_zero", "sft"], loss_weights=[1.0, 0.01, 2.0, 0.5],
         discopop_tau=0.1, beta=0.2),
    dict(loss_type=["sigmoid", "sigmoid"], loss_weights=[0.25, 0.75]),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.05], f_divergence_type="js_divergence"),
    dict(loss_type=["ipo", "hinge", "sft"], f_divergence_type="forward_kl", beta=0.3),
]
F_DIVERGENCE_CASES = [
    dict(loss_type=[t], f_divergence_type=f, **({"label_smoothing": 0.1} if t in ("exo_pair", "robust") else {}))
    for f in ("forward_kl", "js_divergence")
    for t in sorted(F_DIVERGENCE_LOSS_TYPES)
] + [
    # the a -> 1 limit, which TRL computes as reverse_kl (no float32 detour, so float64 works)
    dict(loss_type=["sigmoid", "ipo"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
]


def _id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("options", BASE_CASES + OPTION_CASES + MULTI_CASES + F_DIVERGENCE_CASES, ids=_id)
def test_dpo_loss_matches_trl(options):
    seed = sum(map(ord, _id(options)))
    assert_matches_trl(make_batch(seed), **options)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_down", "aot"])
def test_dpo_loss_matches_trl_at_large_log_ratios(loss_type):
    """Saturated sigmoids and large squares (log-ratios of ~+-100)."""
    assert_matches_trl(make_batch(7, ratio_scale=100.0), loss_type=[loss_type])


def test_sft_from_explicit_chosen_nll_matches_trl():
    out, trl_loss = assert_matches_trl(make_batch(3), chosen_nll_mode="explicit", loss_type=["sigmoid", "sft"])
    assert out.nll_loss is not None


def test_sft_nll_metric_is_the_mean_chosen_token_nll():
    batch = make_batch(5)
    out, _, metrics = run_dk(batch, loss_type=["sft"])
    mask = batch.completion_mask[:B, 1:].bool()
    expected = -batch.token_logps[:B][mask].mean().item()
    assert metrics["nll_loss"] == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
@pytest.mark.parametrize("coef", [0.5, 0.3, 1.7])
def test_alpha_divergence_matches_trl_in_float32(loss_type, coef):
    """TRL's alpha_divergence looks up a clamp by dtype that has no float64 entry (KeyError), so it
    only runs in float32 (or 16-bit): both sides get the same float32 inputs and compute in
    float32; they differ by the order of a few roundings."""
    options = dict(loss_type=[loss_type], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef)
    if loss_type in ("exo_pair", "robust"):
        options["label_smoothing"] = 0.1
    batch = make_batch(11, dtype=torch.float32, ratio_scale=2.0)
    assert_matches_trl(batch, tol=dict(rtol=1e-6, atol=1e-6), **options)


def test_alpha_divergence_clamp_matches_trl():
    """Log-ratios far enough below 0 that TRL's clamp of (a - 1) u at 80 is active (a = 0.5: u < -160)."""
    batch = make_batch(13, dtype=torch.float32, ratio_scale=4.0)
    ref_chosen = batch.ref_chosen.clone()
    ref_chosen[:2] = batch.token_logps[:B].sum(1)[:2] + 200.0  # u_c = -200: clamped
    batch = batch._replace(ref_chosen=ref_chosen)
    out, _ = assert_matches_trl(batch, tol=dict(rtol=1e-6, atol=1e-6), loss_type=["hinge"],
                                f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5, beta=1e-36)
    _, grads, _ = run_dk(batch, loss_type=["hinge"], f_divergence_type="alpha_divergence",
                         f_alpha_divergence_coef=0.5, beta=1e-36)
    assert torch.all(grads[1][:2] == 0)  # nothing flows back past the clamp
    assert torch.all(grads[1][2:] != 0)


def test_reference_free_equals_trl_with_zero_reference():
    batch = make_batch(17)
    zeros = torch.zeros(B, dtype=torch.float64)
    zero = batch._replace(ref_chosen=zeros, ref_rejected=zeros.clone())
    trl_loss, trl_grads, _ = run_trl(zero, loss_type=["sigmoid_norm", "sft"])
    lv = leaves(batch)
    logps = masked(lv.token_logps, batch).sum(1)
    counts = batch.completion_mask[:, 1:].sum(1)
    out = dk.dpo_loss(logps[:B], logps[B:], None, None, reference_free=True, loss_type=["sigmoid_norm", "sft"],
                      chosen_num_tokens=counts[:B], rejected_num_tokens=counts[B:])
    torch.testing.assert_close(out.loss.detach(), trl_loss, **TOL)
    (grad,) = torch.autograd.grad(out.loss, [lv.token_logps])
    torch.testing.assert_close(grad, trl_grads[0], **TOL)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * logps[:B].detach())


@pytest.mark.parametrize("gamma", [0.5, 1.6])
def test_simpo_equals_trl_cpo_simpo(gamma):
    """SimPO = sigmoid_norm + reference_free + simpo_gamma, against TRL's CPOTrainer.cpo_loss
    (loss_type='simpo', which takes the length-averaged log-probs)."""
    import types

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that trl.experimental is unstable
        cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    batch = make_batch(19)
    counts = batch.completion_mask[:, 1:].sum(1)
    beta = 2.0
    lv = leaves(batch)
    avg = masked(lv.token_logps, batch).sum(1) / counts
    fake = types.SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo", label_smoothing=0.0,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    trl_losses, _, _ = cpo.CPOTrainer.cpo_loss(fake, avg[:B], avg[B:])
    (trl_grad,) = torch.autograd.grad(trl_losses.mean(), [lv.token_logps])

    lv = leaves(batch)
    logps = masked(lv.token_logps, batch).sum(1)
    out = dk.dpo_loss(logps[:B], logps[B:], reference_free=True, loss_type="sigmoid_norm", beta=beta,
                      simpo_gamma=gamma, chosen_num_tokens=counts[:B], rejected_num_tokens=counts[B:])
    torch.testing.assert_close(out.losses.detach(), trl_losses.detach(), **TOL)
    (grad,) = torch.autograd.grad(out.loss, [lv.token_logps])
    torch.testing.assert_close(grad, trl_grad, **TOL)
    # the margin matters: without it the loss is smaller
    plain = dk.dpo_loss(logps[:B].detach(), logps[B:].detach(), reference_free=True, loss_type="sigmoid_norm",
                        beta=beta, chosen_num_tokens=counts[:B], rejected_num_tokens=counts[B:])
    assert plain.loss < out.loss
