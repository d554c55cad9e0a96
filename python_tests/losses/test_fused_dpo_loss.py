"""`dk.fused_dpo_loss` against the full-logits float64 oracle (dpo_testing.oracle_fused_dpo_loss):
loss, per-pair losses, log-probs, rewards, metrics and the gradient w.r.t. the policy logits, for
every loss type, with and without shift, LD-DPO, the reference from logits or precomputed, on
every backend available (the Triton kernels under TRITON_INTERPRET on CPU, at tiny shapes).

Tolerances: float64 inputs (cpu, reference backends) 1e-10 relative; float32 inputs 1e-5
relative (docs/design.md, section 5); gradients additionally get an absolute floor of that relative
tolerance times the largest gradient entry (entries near 0 come out of `g * (onehot - p)`, whose
rounding is relative to g, not to the entry).
"""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.losses import LOSS_TYPES
from python_tests.helpers.dpo import make_pref_batch, oracle_fused_dpo_loss
from python_tests.helpers.logps import require_backend

B_CPU, T_CPU, V_CPU = 3, 10, 67
B_TRITON, T_TRITON, V_TRITON = 2, 8, 257  # interpreter-sized

# the options each loss type needs (label_smoothing where it is read) or exercises
TYPE_OPTIONS = {
    "exo_pair": dict(label_smoothing=0.05),
    "robust": dict(label_smoothing=0.2),
    "aot": dict(label_smoothing=0.1),
    "aot_unpaired": dict(label_smoothing=0.1),
    "discopop": dict(discopop_tau=0.2),
}
# (dtype, B, T, V) per (backend, device); the CUDA ones skip without a GPU. With 4 pairs at the GPU
# shape, hinge with a precomputed reference had every pair outside its margin (a zero gradient, which
# check() refuses to compare); 8 pairs keep some active for every loss type and config (checked on CPU
# with the float64 oracle).
BACKENDS = {
    ("cpu", "cpu"): (torch.float64, B_CPU, T_CPU, V_CPU),
    ("reference", "cpu"): (torch.float64, B_CPU, T_CPU, V_CPU),
    ("triton", "cpu"): (torch.float32, B_TRITON, T_TRITON, V_TRITON),
    ("triton", "cuda"): (torch.float32, 8, 33, 5003),
    ("cuda", "cuda"): (torch.float32, 8, 33, 5003),
}
BACKEND_PARAMS = [
    pytest.param(backend, device, id=f"{backend}-{device}", marks=[pytest.mark.gpu] if device == "cuda" else [])
    for backend, device in BACKENDS
]
# (shift, reference source, ld_alpha)
CONFIGS = {
    "shift-reflogits-ld": (True, "logits", 0.6),
    "noshift-precomputed": (False, "precomputed", None),
}


def rtol_for(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def run_fused(batch, backend, *, shift, source, ld_alpha=None, device="cpu", **options):
    """fused_dpo_loss on `device`; the results come back to the CPU."""
    logits = batch.logits.to(device).requires_grad_()
    kwargs = dict(shift=shift, backend=backend, **options)
    if isinstance(kwargs.get("pair_weights"), torch.Tensor):
        kwargs["pair_weights"] = kwargs["pair_weights"].to(device)
    if ld_alpha is not None:
        kwargs["ld_alpha"] = ld_alpha
    if source == "logits":
        kwargs["ref_logits"] = batch.ref_logits.to(device)
    elif source == "precomputed":
        kwargs["ref_chosen_logps"] = batch.ref_chosen.to(device)
        kwargs["ref_rejected_logps"] = batch.ref_rejected.to(device)
    out = dk.fused_dpo_loss(logits, batch.labels.to(device), **kwargs)
    (grad,) = torch.autograd.grad(out.loss, [logits])
    assert not (out.chosen_rewards.requires_grad or out.rejected_rewards.requires_grad)
    assert out.chosen_logps.requires_grad and out.losses.requires_grad
    out = out._replace(**{f: getattr(out, f).detach().cpu() for f in out._fields if f != "metric_tensors"},
                       metric_tensors={k: v.cpu() for k, v in out.metric_tensors.items()})
    return out, grad.cpu()


def run_oracle(batch, *, shift, source, ld_alpha=None, **options):
    logits64 = batch.logits.detach().double().requires_grad_()
    kwargs = dict(shift=shift, ld_alpha=ld_alpha, **options)
    if source == "logits":
        kwargs["ref_logits64"] = batch.ref_logits.double()
    elif source == "precomputed":
        kwargs["ref_chosen"], kwargs["ref_rejected"] = batch.ref_chosen.double(), batch.ref_rejected.double()
    out, chosen, rejected = oracle_fused_dpo_loss(logits64, batch.labels, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, [logits64])
    return out, chosen.detach(), rejected.detach(), grad


def check(batch, backend, *, shift, source, ld_alpha=None, device="cpu", **options):
    out, grad = run_fused(batch, backend, shift=shift, source=source, ld_alpha=ld_alpha, device=device, **options)
    ref, chosen, rejected, ref_grad = run_oracle(batch, shift=shift, source=source, ld_alpha=ld_alpha, **options)
    rtol = rtol_for(batch.logits.dtype)
    close = dict(rtol=rtol, atol=rtol)
    torch.testing.assert_close(out.loss.detach().double(), ref.loss.detach(), **close)
    torch.testing.assert_close(out.losses.detach().double(), ref.losses.detach(), **close)
    torch.testing.assert_close(out.chosen_logps.detach().double(), chosen, rtol=rtol, atol=rtol * 10)
    torch.testing.assert_close(out.rejected_logps.detach().double(), rejected, rtol=rtol, atol=rtol * 10)
    torch.testing.assert_close(out.chosen_rewards.double(), ref.chosen_rewards, **close)
    torch.testing.assert_close(out.rejected_rewards.double(), ref.rejected_rewards, **close)
    scale = ref_grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * scale)
    metrics = out.metrics
    assert metrics["rewards/chosen"] == pytest.approx(ref.chosen_rewards.mean().item(), rel=rtol, abs=rtol)
    assert metrics["rewards/margins"] == pytest.approx(
        (ref.chosen_rewards - ref.rejected_rewards).mean().item(), rel=rtol, abs=rtol)
    assert metrics["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=rtol, abs=rtol)
    loss_types = options.get("loss_type", "sigmoid")
    assert ("nll_loss" in metrics) == ("sft" in ([loss_types] if isinstance(loss_types, str) else loss_types))
    return out, ref


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend, device", BACKEND_PARAMS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_full_logits_oracle(loss_type, backend, device, config):
    require_backend(backend, device)
    dtype, B, T, V = BACKENDS[backend, device]
    shift, source, ld_alpha = CONFIGS[config]
    batch = make_pref_batch(B, T, V, seed=LOSS_TYPES.index(loss_type) * 7 + len(config), dtype=dtype, shift=shift)
    check(batch, backend, shift=shift, source=source, ld_alpha=ld_alpha, device=device, loss_type=loss_type,
          **TYPE_OPTIONS.get(loss_type, {}))


OPTION_CASES = {
    "forward_kl-sigmoid-ipo": dict(loss_type=["sigmoid", "ipo"], f_divergence_type="forward_kl"),
    "js-hinge-sft": dict(loss_type=["hinge", "sft"], loss_weights=[1.0, 0.3], f_divergence_type="js_divergence"),
    "alpha-robust-discopop": dict(loss_type=["robust", "discopop"], f_divergence_type="alpha_divergence",
                                  f_alpha_divergence_coef=0.3, label_smoothing=0.1),
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "simpo": dict(loss_type="sigmoid_norm", reference_free=True, simpo_gamma=0.8, beta=2.0),
    "simpo-sft": dict(loss_type=["sigmoid_norm", "sft"], reference_free=True, simpo_gamma=0.5, beta=2.0),
    "margin-ipo-exo": dict(loss_type=["ipo", "exo_pair"], simpo_gamma=0.3, label_smoothing=0.01),
    "pair_weights": dict(loss_type=["sigmoid", "sppo_hard", "sft"], pair_weights="random"),
    "ld-zero": dict(loss_type=["sigmoid", "sft"], ld_alpha=0.0),
    "ld-one": dict(loss_type=["apo_zero", "sigmoid_norm"], ld_alpha=1.0),
}


@pytest.mark.parametrize("backend, device", BACKEND_PARAMS)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_full_logits_oracle(case, backend, device):
    require_backend(backend, device)
    dtype, B, T, V = BACKENDS[backend, device]
    options = dict(OPTION_CASES[case])
    batch = make_pref_batch(B, T, V, seed=len(case), dtype=dtype)
    if options.get("pair_weights") == "random":
        options["pair_weights"] = torch.rand(B, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5
    ld_alpha = options.pop("ld_alpha", 0.5 if case.startswith("mpo") else None)
    source = "none" if options.get("reference_free") else "logits"
    check(batch, backend, shift=True, source=source, ld_alpha=ld_alpha, device=device, **options)


@pytest.mark.parametrize("backend, device", BACKEND_PARAMS)
def test_row_without_scored_tokens(backend, device):
    """A completion with no scored token: log-prob 0, its length clamped to 1 for ipo/sigmoid_norm."""
    require_backend(backend, device)
    dtype, B, T, V = BACKENDS[backend, device]
    batch = make_pref_batch(B, T, V, seed=3, dtype=dtype, empty_row=True)
    out, _ = check(batch, backend, shift=True, source="logits", ld_alpha=0.5, device=device,
                   loss_type=["ipo", "sigmoid_norm", "sft"])
    assert out.chosen_logps[1].item() == 0.0
    assert torch.isfinite(out.loss)


def test_bfloat16_logits_match_oracle_on_rounded_values():
    """16-bit logits: log-probs accumulate in fp32, so the loss is within fp32 tolerance of the
    float64 oracle run on the same (rounded) values; the gradient is rounded once to bf16."""
    require_backend("cpu", "cpu")
    batch = make_pref_batch(2, 9, 50, seed=21, dtype=torch.bfloat16)
    out, grad = run_fused(batch, "cpu", shift=True, source="logits", ld_alpha=0.7, loss_type=["sigmoid", "sft"])
    ref, _, _, ref_grad = run_oracle(batch, shift=True, source="logits", ld_alpha=0.7, loss_type=["sigmoid", "sft"])
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.detach().double(), ref.loss.detach(), rtol=1e-5, atol=1e-5)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2.0**-8 + 1e-5, atol=1e-5 * scale)


def test_reference_logits_get_no_gradient_and_precomputed_reference_does():
    require_backend("cpu", "cpu")
    batch = make_pref_batch(2, 6, 20, seed=4)
    ref_logits = batch.ref_logits.clone().requires_grad_()
    logits = batch.logits.clone().requires_grad_()
    out = dk.fused_dpo_loss(logits, batch.labels, ref_logits=ref_logits, backend="cpu")
    out.loss.backward()
    assert ref_logits.grad is None and logits.grad is not None
    ref_c = batch.ref_chosen.clone().requires_grad_()
    ref_r = batch.ref_rejected.clone().requires_grad_()
    out = dk.fused_dpo_loss(batch.logits, batch.labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                            backend="cpu")
    g_c, g_r = torch.autograd.grad(out.loss, [ref_c, ref_r])
    # d/d ref of -log sigmoid(beta (pc - rc - pr + rr)) / B: opposite signs, same magnitude
    torch.testing.assert_close(g_c, -g_r)
    assert torch.all(g_c > 0)


def test_module_equals_function():
    require_backend("cpu", "cpu")
    batch = make_pref_batch(2, 7, 30, seed=5)
    options = dict(beta=0.3, loss_type=["ipo", "sft"], loss_weights=[1.0, 0.1], ld_alpha=0.4)
    module = dk.FusedDPOLoss(shift=True, backend="cpu", **options)
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)
    got = module(batch.logits, batch.labels, ref_logits=batch.ref_logits, pair_weights=weights)
    want = dk.fused_dpo_loss(batch.logits, batch.labels, ref_logits=batch.ref_logits, shift=True, backend="cpu",
                             pair_weights=weights, **options)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.losses, want.losses)
    assert got.metrics == want.metrics
    assert "beta=0.3" in repr(module) and "ld_alpha=0.4" in repr(module)
    assert list(module.parameters()) == []


def test_pair_weights_scale_per_pair_losses():
    """Hand check of pair_weights: losses_i = w_i * l_i and loss = mean(w_i * l_i)."""
    require_backend("cpu", "cpu")
    batch = make_pref_batch(3, 6, 20, seed=6)
    weights = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    plain = dk.fused_dpo_loss(batch.logits, batch.labels, ref_logits=batch.ref_logits, backend="cpu")
    weighted = dk.fused_dpo_loss(batch.logits, batch.labels, ref_logits=batch.ref_logits, backend="cpu",
                                 pair_weights=weights)
    torch.testing.assert_close(weighted.losses, plain.losses * weights, rtol=1e-14, atol=0)
    torch.testing.assert_close(weighted.loss, (plain.losses * weights).mean(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend, device", BACKEND_PARAMS)
def test_wpo_and_token_metrics_match_reference_backend(backend, device):
    """WPO's weights and TRL's per-token metrics (entropy, logits/*, mean_token_accuracy) from the
    kernels' extras equal the plain-PyTorch backend's (full float64 log-softmax) on the same values."""
    require_backend(backend, device)
    dtype, B, T, V = BACKENDS[backend, device]
    batch = make_pref_batch(B, T, V, seed=8, dtype=dtype)
    options = dict(loss_type=["sigmoid", "ipo"], use_weighting=True, beta=0.2)
    out, grad = run_fused(batch, backend, shift=True, source="logits", ld_alpha=0.5, device=device, **options)
    x64 = batch.logits.detach().double().requires_grad_()
    ref = dk.fused_dpo_loss(x64, batch.labels, ref_logits=batch.ref_logits.double(), shift=True, backend="reference",
                            ld_alpha=0.5, **options)
    (ref_grad,) = torch.autograd.grad(ref.loss, [x64])
    rtol = rtol_for(dtype)
    torch.testing.assert_close(out.loss.double(), ref.loss.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(out.losses.double(), ref.losses.detach(), rtol=rtol, atol=rtol)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * scale)
    got, want = out.metrics, ref.metrics
    assert set(got) == set(want) and {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"} <= set(got)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=rtol, abs=rtol), name


def test_inplace_backward_through_function_and_module():
    """inplace_backward=True: the same gradient, written into the policy logits' own storage."""
    require_backend("cpu", "cpu")
    batch = make_pref_batch(2, 7, 30, seed=6)
    options = dict(beta=0.3, loss_type=["sigmoid", "sft"], ld_alpha=0.5, use_weighting=False)

    def gradient(call):
        leaf = batch.logits.clone().requires_grad_()
        x = leaf * 1  # a model output: in-place backward overwrites it
        (grad,) = torch.autograd.grad(call(x).loss, [leaf])
        return grad, x.detach()

    def function(x, **kw):
        return dk.fused_dpo_loss(x, batch.labels, ref_logits=batch.ref_logits, shift=True, backend="cpu", **options,
                                 **kw)

    want, untouched = gradient(function)
    assert torch.equal(untouched, batch.logits)
    got, storage = gradient(lambda x: function(x, inplace_backward=True))
    assert torch.equal(got, want) and torch.equal(storage, want)
    module = dk.FusedDPOLoss(shift=True, backend="cpu", inplace_backward=True, **options)
    got, storage = gradient(lambda x: module(x, batch.labels, ref_logits=batch.ref_logits))
    assert torch.equal(got, want) and torch.equal(storage, want)
    assert "inplace_backward=True" in repr(module)
