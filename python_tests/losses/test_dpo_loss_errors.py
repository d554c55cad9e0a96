"""Every invalid option or input of `dk.dpo_loss`, `dk.fused_dpo_loss` and `dk.FusedDPOLoss`
raises (ValueError, or TypeError for a wrong type or an unknown option name) with a message
naming the option, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.backends import cpu_token_logps

B = 3


def pair(value=0.0, n=B, dtype=torch.float64):
    return torch.full((n,), value, dtype=dtype)


def call_dpo_loss(**overrides):
    args = dict(chosen_logps=pair(-1.0), rejected_logps=pair(-2.0), ref_chosen_logps=pair(-1.5),
                ref_rejected_logps=pair(-1.5))
    args.update(overrides)
    return dk.dpo_loss(args.pop("chosen_logps"), args.pop("rejected_logps"), args.pop("ref_chosen_logps"),
                       args.pop("ref_rejected_logps"), **args)


COUNTS = dict(chosen_num_tokens=torch.tensor([3, 4, 5]), rejected_num_tokens=torch.tensor([2, 2, 2]))

DPO_LOSS_ERRORS = [
    (dict(loss_type="dpo"), ValueError, r"loss_type: unknown loss type 'dpo'"),
    (dict(loss_type=["sigmoid", "simpo"]), ValueError, r"loss_type: unknown loss type 'simpo'"),
    (dict(loss_type=[]), ValueError, r"loss_type must be"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError,
     r"loss_weights has 1 entries but loss_type has 2"),
    (dict(loss_weights=[1.0, 2.0]), ValueError, r"loss_weights has 2 entries"),
    (dict(loss_weights="1"), TypeError, r"loss_weights must be a list"),
    (dict(loss_weights=[float("nan")]), ValueError, r"loss_weights\[0\] must be finite"),
    (dict(loss_type="exo_pair"), ValueError, r"label_smoothing must be in \(0, 1\) with loss_type 'exo_pair'"),
    (dict(loss_type="exo_pair", label_smoothing=1.0), ValueError, r"label_smoothing .* 'exo_pair'"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError,
     r"label_smoothing must be in \[0, 0.5\) with loss_type 'robust'"),
    (dict(loss_type="robust", label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(f_divergence_type="kl"), ValueError, r"f_divergence_type must be one of"),
    (dict(loss_type=["sigmoid", "bco_pair"], f_divergence_type="js_divergence"), ValueError,
     r"f_divergence_type='js_divergence' is not defined for loss type\(s\) \['bco_pair'\]"),
    (dict(loss_type="aot", f_divergence_type="alpha_divergence"), ValueError, r"f_divergence_type='alpha_divergence'"),
    (dict(f_alpha_divergence_coef=float("inf")), ValueError, r"f_alpha_divergence_coef must be finite"),
    (dict(loss_type="ipo"), ValueError, r"chosen_num_tokens is None, but loss type\(s\) \['ipo'\]"),
    (dict(loss_type="sigmoid_norm", chosen_num_tokens=COUNTS["chosen_num_tokens"]), ValueError,
     r"rejected_num_tokens is None, but loss type\(s\) \['sigmoid_norm'\]"),
    (dict(loss_type="sft"), ValueError, r"chosen_nll is None and so is chosen_num_tokens"),
    (dict(loss_type="sft", chosen_nll=pair(1.0, n=2)), ValueError, r"chosen_nll must have shape \[3\] or a scalar"),
    (dict(beta=0.0), ValueError, r"beta must be > 0"),
    (dict(beta=-0.1), ValueError, r"beta must be > 0"),
    (dict(beta="0.1"), TypeError, r"beta must be a real number"),
    (dict(beta=True), TypeError, r"beta must be a real number"),
    (dict(discopop_tau=0.0, loss_type="discopop"), ValueError, r"discopop_tau must be > 0"),
    (dict(simpo_gamma=0.5, loss_type="bco_pair"), ValueError, r"simpo_gamma .* loss type\(s\) \['bco_pair'\]"),
    (dict(simpo_gamma=0.5, loss_type=["sigmoid", "aot"]), ValueError, r"simpo_gamma .* \['aot'\]"),
    (dict(reference_free=1), TypeError, r"reference_free must be a bool"),
    (dict(rejected_logps=pair(n=4)), ValueError, r"rejected_logps must have shape \[3\]"),
    (dict(chosen_logps=torch.zeros(3, 1, dtype=torch.float64)), ValueError, r"chosen_logps must have shape \[B\]"),
    (dict(chosen_logps=torch.zeros(0)), ValueError, r"chosen_logps must have shape \[B\] with B >= 1"),
    (dict(chosen_logps=[0.0, 0.0, 0.0]), TypeError, r"chosen_logps must be a torch.Tensor"),
    (dict(ref_chosen_logps=torch.zeros(3, dtype=torch.long)), TypeError, r"ref_chosen_logps must be a floating-point"),
    (dict(ref_rejected_logps=None), ValueError, r"ref_rejected_logps is None: .* reference_free=True"),
    (dict(ref_chosen_logps=pair(n=2)), ValueError, r"ref_chosen_logps must have shape \[3\]"),
    (dict(loss_type="ipo", chosen_num_tokens=torch.tensor([1, 2]), rejected_num_tokens=torch.tensor([1, 2, 3])),
     ValueError, r"chosen_num_tokens must have shape \[3\]"),
    (dict(loss_type="ipo", chosen_num_tokens=torch.ones(3, dtype=torch.bool), rejected_num_tokens=torch.ones(3)),
     TypeError, r"chosen_num_tokens must be an integer or floating-point"),
    (dict(pair_weights=pair(n=4)), ValueError, r"pair_weights must have shape \[3\]"),
    (dict(pair_weights=pair(1.0), loss_type=["sigmoid", "aot_unpaired"]), ValueError,
     r"pair_weights cannot be used with loss type\(s\) \['aot_unpaired'\]"),
    (dict(rejected_logps=pair().to("meta")), ValueError, r"rejected_logps is on meta but chosen_logps is on cpu"),
]


@pytest.mark.parametrize("overrides, error, message", DPO_LOSS_ERRORS,
                         ids=[m for _, _, m in DPO_LOSS_ERRORS])
def test_dpo_loss_rejects(overrides, error, message):
    with pytest.raises(error, match=message):
        call_dpo_loss(**overrides)


def test_valid_edge_values_are_accepted():
    """The boundaries that are allowed: robust at 0, aot at 1, exo_pair just above 0, alpha = 1."""
    for options in (dict(loss_type="robust", label_smoothing=0.0), dict(loss_type="aot", label_smoothing=1.0),
                    dict(loss_type="exo_pair", label_smoothing=1e-9),
                    dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
                    dict(ref_chosen_logps=None, ref_rejected_logps=None, reference_free=True),
                    dict(loss_type="sft", chosen_nll=torch.tensor(2.0, dtype=torch.float64)),
                    dict(loss_type=["sigmoid_norm", "sft"], simpo_gamma=1.0, **COUNTS)):
        assert torch.isfinite(call_dpo_loss(**options).loss)


# ---------------------------------------------------------------------------------------------
# fused_dpo_loss


@pytest.fixture
def no_kernel(monkeypatch):
    """Fails the test if a CPU kernel runs: every error below is raised before any kernel."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the error was raised")

    for name in dir(cpu_token_logps):
        if name.startswith(("forward", "backward", "token_logps")) and callable(getattr(cpu_token_logps, name)):
            monkeypatch.setattr(cpu_token_logps, name, forbidden)


def fused_inputs(S=2 * B, T=5, V=11):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(S, T, V, generator=gen)
    labels = torch.randint(0, V, (S, T), generator=gen)
    return logits, labels


def call_fused(**overrides):
    logits, labels = fused_inputs()
    args = dict(policy_logits=logits, labels=labels, ref_chosen_logps=torch.zeros(B), ref_rejected_logps=torch.zeros(B),
                backend="cpu")
    args.update(overrides)
    return dk.fused_dpo_loss(args.pop("policy_logits"), args.pop("labels"), **args)


FUSED_ERRORS = [
    (dict(gamma=0.5), TypeError, r"fused_dpo_loss\(\) got unknown loss option\(s\) \['gamma'\]"),
    (dict(betta=0.5, rpo_alpha=1.0), TypeError, r"unknown loss option\(s\) \['betta', 'rpo_alpha'\]"),
    (dict(chosen_num_tokens=torch.ones(B)), TypeError, r"unknown loss option\(s\) \['chosen_num_tokens'\]"),
    (dict(loss_type="exo_pair"), ValueError, r"label_smoothing .* 'exo_pair'"),
    (dict(loss_type="kto"), ValueError, r"loss_type: unknown loss type 'kto'"),
    (dict(beta=0), ValueError, r"beta must be > 0"),
    (dict(use_weighting=True, loss_type="aot"), ValueError, r"use_weighting=True cannot be used with .*'aot'"),
    (dict(inplace_backward=1), TypeError, r"inplace_backward must be a bool"),
    (dict(use_weighting=1), TypeError, r"use_weighting must be a bool"),
    (dict(ld_alpha=1.5), ValueError, r"ld_alpha must be in \[0, 1\]"),
    (dict(ld_alpha=-0.1), ValueError, r"ld_alpha must be in \[0, 1\]"),
    (dict(ld_alpha="0.5"), TypeError, r"ld_alpha must be a real number"),
    (dict(policy_logits=torch.randn(5, 5, 11), labels=torch.zeros(5, 5, dtype=torch.long)), ValueError,
     r"policy_logits must hold 2B rows.* got 5 rows"),
    (dict(policy_logits=torch.randn(0, 5, 11), labels=torch.zeros(0, 5, dtype=torch.long)), ValueError,
     r"policy_logits must hold 2B rows"),
    (dict(policy_logits=torch.randn(30, 11)), ValueError, r"policy_logits must be 3-D"),
    (dict(labels=torch.zeros(6, 4, dtype=torch.long)), ValueError, r"labels must have shape \(6, 5\)"),
    (dict(labels=torch.zeros(6, 5)), TypeError, r"labels must be an integer tensor"),
    (dict(ref_chosen_logps=torch.zeros(4)), ValueError, r"ref_chosen_logps must have shape \[3\]"),
    (dict(ref_rejected_logps=torch.zeros(3, 1)), ValueError, r"ref_rejected_logps must have shape \[3\]"),
    (dict(ref_rejected_logps=None), ValueError, r"ref_rejected_logps is None: give both"),
    (dict(ref_chosen_logps=None), ValueError, r"ref_chosen_logps is None: give both"),
    (dict(ref_logits=torch.randn(6, 5, 11)), ValueError, r"give either ref_logits or ref_chosen_logps"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None), ValueError, r"no reference: give ref_chosen_logps"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_logits=torch.randn(6, 5, 12)), ValueError,
     r"ref_logits must have the shape of policy_logits \(6, 5, 11\)"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_logits=torch.randn(6, 5, 11).to("meta")), ValueError,
     r"ref_logits is on meta but policy_logits is on cpu"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_logits=torch.randn(6, 5, 11, dtype=torch.float64),
          backend="triton"), TypeError, r"ref_logits dtype float64 is supported by backend='cpu'"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_logits=torch.randn(6, 11, 5).transpose(1, 2)),
     ValueError, r"ref_logits must have unit stride"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_logits=torch.randn(6, 5, 11), reference_free=True),
     ValueError, r"ref_logits is given but reference_free=True"),
    (dict(pair_weights=torch.ones(2)), ValueError, r"pair_weights must have shape \[3\]"),
    (dict(pair_weights=torch.ones(3), loss_type="aot"), ValueError, r"pair_weights cannot be used with"),
    (dict(backend="gpu"), ValueError, r"backend must be one of"),
    (dict(shift=1), TypeError, r"shift must be a bool"),
    (dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int"),
    (dict(labels=torch.full((6, 5), 11)), ValueError, r"labels\[0, 0\] = 11 is outside \[0, 11\)"),
]


@pytest.mark.parametrize("overrides, error, message", FUSED_ERRORS, ids=[m for _, _, m in FUSED_ERRORS])
def test_fused_dpo_loss_rejects_before_any_kernel(overrides, error, message, no_kernel):
    with pytest.raises(error, match=message):
        call_fused(**overrides)


def test_no_kernel_fixture_would_catch_a_kernel(no_kernel):
    """The guard above is real: a valid call does reach the (forbidden) kernel."""
    with pytest.raises(AssertionError, match="a kernel ran"):
        call_fused()


def test_fused_dpo_loss_reference_free_ignores_precomputed_reference():
    a = call_fused(reference_free=True)
    b = call_fused(reference_free=True, ref_chosen_logps=None, ref_rejected_logps=None)
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("options, error, message", [
    (dict(gamma=1.0), TypeError, r"FusedDPOLoss\(\) got unknown loss option\(s\) \['gamma'\]"),
    (dict(pair_weights=torch.ones(3)), TypeError, r"pair_weights in forward\(\)"),
    (dict(loss_type="robust", label_smoothing=0.7), ValueError, r"label_smoothing"),
    (dict(use_weighting=True, loss_type="aot_unpaired"), ValueError, r"use_weighting=True cannot"),
    (dict(inplace_backward="yes"), TypeError, r"inplace_backward must be a bool"),
    (dict(backend="tpu"), ValueError, r"backend must be one of"),
    (dict(shift="yes"), TypeError, r"shift must be a bool"),
])
def test_module_rejects_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        dk.FusedDPOLoss(**options)


def test_fused_dpo_loss_names_the_device_of_the_logits(no_kernel):
    with pytest.raises(ValueError, match=r"ref_chosen_logps is on meta but policy_logits is on cpu"):
        call_fused(ref_chosen_logps=torch.zeros(B, device="meta"))
    with pytest.raises(ValueError, match=r"pair_weights is on meta but policy_logits is on cpu"):
        call_fused(pair_weights=torch.ones(B, device="meta"))
