"""`torch.compile(fullgraph=True)` through `dk.fused_dpo_loss` (cpu backend): no graph break, the
same loss, per-pair losses, metrics and gradients as eager, and no recompilation on new values.

fullgraph=True fails on any graph break, so these tests also pin that the call never reads a
tensor's value on the host: the metrics are returned as tensors (`metric_tensors`) and turned
into floats only when `DPOOutput.metrics` is read, outside the compiled function.
"""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.dpo import make_pref_batch
from python_tests.helpers.logps import require_backend

CASES = {
    "sigmoid-sft-ld-reflogits": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5),
    "ipo-js": dict(loss_type="ipo", f_divergence_type="js_divergence"),
    "simpo-pair-weights": dict(loss_type="sigmoid_norm", reference_free=True, simpo_gamma=0.5, beta=2.0),
    "aot-alpha": dict(loss_type=["aot", "sppo_hard"], label_smoothing=0.1),
    "robust-alpha-precomputed": dict(loss_type="robust", label_smoothing=0.2, f_divergence_type="alpha_divergence"),
}


def _inputs(case, seed, dtype=torch.float32):
    batch = make_pref_batch(2, 7, 33, seed=seed, dtype=dtype)
    options = dict(CASES[case])
    kwargs = {}
    if options.get("reference_free"):
        kwargs["pair_weights"] = torch.tensor([0.5, 1.5], dtype=dtype)
    elif case.endswith("precomputed"):
        kwargs.update(ref_chosen_logps=batch.ref_chosen, ref_rejected_logps=batch.ref_rejected)
    else:
        kwargs["ref_logits"] = batch.ref_logits
    return batch, dict(options, **kwargs)


def _run(fn, batch, options):
    logits = batch.logits.clone().requires_grad_()
    out = fn(logits, batch.labels, options)
    (grad,) = torch.autograd.grad(out.loss, [logits])
    return out, grad


def _fused(logits, labels, options):
    # logits[:, :-1]: a strided view, as a model's output is usually sliced
    if "ref_logits" in options:
        options = dict(options, ref_logits=options["ref_logits"][:, :-1])
    return dk.fused_dpo_loss(logits[:, :-1], labels[:, :-1], shift=True, backend="cpu", **options)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_fused_dpo_loss_matches_eager(case):
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(_fused, fullgraph=True)
    batch, options = _inputs(case, seed=len(case))
    eager_out, eager_grad = _run(_fused, batch, options)
    out, grad = _run(compiled, batch, options)
    assert isinstance(out, dk.DPOOutput)
    # Same kernels on the same values; only the [B]-sized arithmetic around them may be fused
    # differently by Inductor: a few fp32 roundings.
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, eager_out.loss, **close)
    torch.testing.assert_close(out.losses, eager_out.losses, **close)
    torch.testing.assert_close(out.chosen_logps, eager_out.chosen_logps, **close)
    torch.testing.assert_close(out.rejected_rewards, eager_out.rejected_rewards, **close)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-6 * eager_grad.abs().max().item())
    assert set(out.metrics) == set(eager_out.metrics)
    for name, value in eager_out.metrics.items():
        assert out.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    assert eager_grad.abs().max() > 0


def test_compiled_call_reuses_its_graph_and_computes_on_new_values():
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(_fused, fullgraph=True)
    case = "sigmoid-sft-ld-reflogits"
    first, _ = _run(compiled, *_inputs(case, seed=1))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    batch, options = _inputs(case, seed=2)
    second, grad = _run(compiled, batch, options)
    assert counters["stats"]["unique_graphs"] == graphs, "the second call recompiled"
    assert not torch.equal(first.loss, second.loss)
    eager, eager_grad = _run(_fused, batch, options)
    torch.testing.assert_close(second.loss, eager.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-6 * eager_grad.abs().max().item())


def test_compiled_module():
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    module = dk.FusedDPOLoss(shift=True, backend="cpu", loss_type=["ipo", "sft"], ld_alpha=0.3)
    compiled = torch.compile(module, fullgraph=True)
    batch = make_pref_batch(2, 7, 33, seed=9, dtype=torch.float32)
    eager = module(batch.logits, batch.labels, ref_logits=batch.ref_logits)
    out = compiled(batch.logits, batch.labels, ref_logits=batch.ref_logits)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-6, atol=1e-6)
    assert out.metrics["nll_loss"] == pytest.approx(eager.metrics["nll_loss"], rel=1e-6)
