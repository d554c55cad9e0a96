"""`dk.fused_linear_dpo_loss` / `dk.FusedLinearDPOLoss`:

- against the full-logits float64 oracle (logits = hidden @ weight.T, then dpo_testing's oracle):
  loss, per-pair losses, log-probs, rewards and the gradients w.r.t. hidden, weight and bias, for
  every loss type, on every available backend (float64 on cpu, float32 on Triton's interpreter);
- against TRL 1.16's own `DPOTrainer._compute_loss` fed with our per-token log-probs and extras:
  WPO (`use_weighting`) and the metrics TRL logs from the extras (`entropy`, `logits/*`,
  `mean_token_accuracy`).
"""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.losses import LOSS_TYPES
from python_tests.helpers.dpo import oracle_fused_dpo_loss
from python_tests.helpers.logps import require_backend

TYPE_OPTIONS = {
    "exo_pair": dict(label_smoothing=0.05),
    "robust": dict(label_smoothing=0.2),
    "aot": dict(label_smoothing=0.1),
    "aot_unpaired": dict(label_smoothing=0.1),
    "discopop": dict(discopop_tau=0.2),
}
BACKENDS = {  # backend, device -> dtype, B, T, H, V
    ("cpu", "cpu"): (torch.float64, 3, 9, 16, 61),
    ("reference", "cpu"): (torch.float64, 3, 9, 16, 61),
    ("triton", "cpu"): (torch.float32, 2, 7, 16, 53),
    ("triton", "cuda"): (torch.float32, 4, 33, 64, 5003),
    ("cuda", "cuda"): (torch.float32, 4, 33, 64, 5003),
}
BACKEND_PARAMS = [
    pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else []) for b, d in BACKENDS
]


def make_batch(dtype, B, T, H, V, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    S = 2 * B
    hidden = torch.randn(S, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H ** 0.5 * 2
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    ref_hidden = hidden + 0.3 * torch.randn(S, T, H, generator=gen, dtype=torch.float64)
    idx = torch.arange(T)
    prompt = torch.randint(1, T // 2, (S,), generator=gen)
    end = torch.maximum(torch.randint(T - T // 3, T + 1, (S,), generator=gen), prompt + 2)
    keep = (idx >= prompt[:, None]) & (idx < end[:, None])
    labels = torch.where(keep, torch.randint(0, V, (S, T), generator=gen), torch.full((S, T), -100))
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(hidden), cast(weight), cast(b), cast(ref_hidden), labels


def rtol_for(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_full_logits_oracle(loss_type, backend, device):
    require_backend(backend, device)
    dtype, B, T, H, V = BACKENDS[(backend, device)]
    hidden, weight, bias, ref_hidden, labels = make_batch(dtype, B, T, H, V, seed=len(loss_type))
    options = dict(beta=0.2, loss_type=loss_type, ld_alpha=0.7, **TYPE_OPTIONS.get(loss_type, {}))

    leaves = [t.to(device).requires_grad_() for t in (hidden, weight, bias)]
    out = dk.fused_linear_dpo_loss(leaves[0], leaves[1], labels.to(device), leaves[2],
                                   ref_hidden=ref_hidden.to(device), shift=True, chunk_size=16, backend=backend,
                                   **options)
    grads = torch.autograd.grad(out.loss, leaves)

    leaves64 = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits64 = leaves64[0] @ leaves64[1].T + leaves64[2]
    ref_logits64 = (ref_hidden.double() @ weight.double().T + bias.double()).detach()
    ref_out, chosen, rejected = oracle_fused_dpo_loss(logits64, labels, ref_logits64=ref_logits64, shift=True,
                                                      **options)
    grads64 = torch.autograd.grad(ref_out.loss, leaves64)

    rtol = rtol_for(dtype)
    torch.testing.assert_close(out.loss.double().cpu(), ref_out.loss, rtol=rtol, atol=rtol)
    torch.testing.assert_close(out.losses.double().cpu(), ref_out.losses, rtol=rtol, atol=rtol)
    torch.testing.assert_close(out.chosen_logps.double().cpu(), chosen.detach(), rtol=rtol, atol=rtol * T)
    torch.testing.assert_close(out.rejected_logps.double().cpu(), rejected.detach(), rtol=rtol, atol=rtol * T)
    for got, want in zip(grads, grads64):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol * 10, atol=rtol * 10 * scale)


def _trl_inputs(out_tokens: dk.LogpsOutput, labels):
    """Our position-aligned per-token values as TRL's `[2B, T - 1]` arrays (completion_mask[:, 1:])."""
    completion_mask = (labels != -100).long()
    tokens = {"token_logps": out_tokens.token_logps[:, :-1]}
    for name in ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs"):
        tokens[name] = getattr(out_tokens, name)[:, :-1]
    return completion_mask, tokens


@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "sft"], "ipo", "apo_zero"], ids=str)
@pytest.mark.parametrize("use_weighting", [False, True], ids=["plain", "wpo"])
def test_loss_and_metrics_equal_trl_given_the_same_token_values(loss_type, use_weighting):
    pytest.importorskip("trl")
    from python_tests.helpers.trl_harness import trl_dpo_loss  # noqa: PLC0415

    hidden, weight, bias, _, labels = make_batch(torch.float64, 3, 10, 16, 41, seed=7)
    ref_chosen = -torch.rand(3, dtype=torch.float64) * 20
    ref_rejected = -torch.rand(3, dtype=torch.float64) * 20
    options = dict(beta=0.3, loss_type=loss_type, use_weighting=use_weighting)
    out = dk.fused_linear_dpo_loss(hidden, weight, labels, bias, ref_chosen_logps=ref_chosen,
                                   ref_rejected_logps=ref_rejected, shift=True, backend="cpu", **options)
    tokens = dk.linear_sequence_logps(hidden, weight, labels, bias, shift=True, return_token_logps=True,
                                      extras=("entropy", "mean_logits", "is_top1", "log_sum_sq_probs"),
                                      backend="cpu")
    completion_mask, per_token = _trl_inputs(tokens, labels)
    call_trl = lambda: trl_dpo_loss(  # noqa: E731
        per_token["token_logps"], completion_mask, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
        loss_type=loss_type if isinstance(loss_type, list) else [loss_type], beta=0.3, use_weighting=use_weighting,
        extras={k: v for k, v in per_token.items() if k != "token_logps"},
    )
    if use_weighting and "sft" in loss_type:
        # TRL 1.16 cannot run this combination: it multiplies its expanded (stride-0) sft loss in
        # place by the WPO weights. Ours weighs the sft term per pair like every other loss type
        # (checked by test_wpo_weights_scale_the_losses_and_get_no_gradient).
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            call_trl()
        return
    trl_loss, trl_metrics = call_trl()
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-10, atol=1e-12)
    metrics = out.metrics
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
                 "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        # TRL takes the two accuracies as fp32 fractions (`.float().mean()`, int / int tensors)
        rel = 2 ** -24 if name in ("rewards/accuracies", "mean_token_accuracy") else 1e-9
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=rel, abs=1e-12), name


def test_wpo_weights_scale_the_losses_and_get_no_gradient():
    hidden, weight, bias, _, labels = make_batch(torch.float64, 2, 8, 12, 37, seed=3)
    ref = dict(ref_chosen_logps=torch.full((2,), -30.0, dtype=torch.float64),
               ref_rejected_logps=torch.full((2,), -30.0, dtype=torch.float64))
    h = hidden.requires_grad_()
    plain = dk.fused_linear_dpo_loss(h, weight, labels, bias, shift=True, backend="cpu", **ref)
    wpo = dk.fused_linear_dpo_loss(h, weight, labels, bias, shift=True, backend="cpu", use_weighting=True, **ref)
    ratio = wpo.losses / plain.losses
    assert ((ratio > 0) & (ratio <= 1)).all()  # exp(mean log p - log sum p^2) <= 1 for each side
    # the gradient is the plain one times the (constant) weights, pair by pair
    g_plain = torch.autograd.grad((plain.losses * ratio.detach()).mean(), h)[0]
    g_wpo = torch.autograd.grad(wpo.loss, h)[0]
    torch.testing.assert_close(g_wpo, g_plain, rtol=1e-10, atol=1e-14)


def test_module_equals_function_and_reference_weight_defaults():
    hidden, weight, bias, ref_hidden, labels = make_batch(torch.float64, 2, 8, 12, 37, seed=5)
    module = dk.FusedLinearDPOLoss(beta=0.2, loss_type="hinge", shift=True, softcap=3.0, backend="cpu")
    got = module(hidden, weight, labels, bias, ref_hidden=ref_hidden)
    want = dk.fused_linear_dpo_loss(hidden, weight, labels, bias, ref_hidden=ref_hidden, ref_weight=weight,
                                    ref_bias=bias, beta=0.2, loss_type="hinge", shift=True, softcap=3.0,
                                    backend="cpu")
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    assert "softcap=3.0" in repr(module)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), ValueError, "no reference"),
    (dict(ref_chosen_logps=torch.zeros(2)), ValueError, "ref_rejected_logps is None"),
    (dict(reference_free=True, ref_weight=torch.zeros(37, 12)), ValueError, "ref_weight is given without ref_hidden"),
    (dict(ref_hidden=torch.zeros(4, 8, 5)), ValueError, "ref_weight must be"),
    (dict(reference_free=True, use_weighting=True, loss_type="aot"), ValueError, "use_weighting=True cannot"),
    (dict(reference_free=True, use_weighting=1), TypeError, "use_weighting must be a bool"),
    (dict(reference_free=True, wpo=True), TypeError, "unknown loss option"),
])
def test_bad_arguments(kwargs, error, match):
    hidden, weight, _, _, labels = make_batch(torch.float32, 2, 8, 12, 37, seed=1, bias=False)
    with pytest.raises(error, match=match):
        dk.fused_linear_dpo_loss(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="2B rows"):
        dk.fused_linear_dpo_loss(hidden[:3], weight, labels[:3], reference_free=True)
