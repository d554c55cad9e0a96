"""`torch.compile(fullgraph=True)` traces through the linear path (`dk.linear_sequence_logps`,
`dk.fused_linear_dpo_loss` in its three modes, `dk.FusedLinearDPOLoss`) and gives the eager values
and gradients.

The compaction (`dpo_kernels::scored_positions`, an unbacked count N of scored positions), the
chunk loops (`dpo_kernels::linear_token_logps` and its backward) and eager_backward's block loop
(`dpo_kernels::eager_linear_dpo_gradients`) are custom ops with fake implementations, so nothing
reads N on the host while tracing and a new mask (a new N) reuses the compiled graph. The same
kernels run on the same inputs compiled or not: only the small `[S, T]` / `[B]` arithmetic around
them may be fused differently, a few fp32 roundings. Backend "aot_eager" (AOTAutograd's joint
graph, the part that checks the fakes and the autograd formulas, without Inductor's compile time),
one case with the default Inductor backend.
"""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.logps import require_backend

EXTRAS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
CLOSE = dict(rtol=1e-6, atol=1e-6)
MODES = {  # fused_linear_dpo_loss keywords of each mode
    "recompute": dict(),
    "cached": dict(cache_budget_bytes=1 << 30),
    # a block holds one pair's tiles (10 tokens at most * V * 4 bytes): blocks of 1 and 2 pairs
    "eager_backward": dict(eager_backward=True, cache_budget_bytes=20 * 300 * 4),
}


def _masked_labels(gen, S, T, V, *, variant=0):
    labels = torch.randint(0, V, (S, T), generator=gen)
    if variant == 0:
        labels[0, :3] = -100  # prompt
        labels[1, -2:] = -100  # padding
        labels[S // 2 + 1] = -100  # an all-masked row
    else:  # other prompt and padding lengths: another count of scored tokens
        labels[:, :1] = -100
        labels[-1, -3:] = -100
    return labels


def _linear_inputs(S=4, T=7, H=16, V=300, seed=0, variant=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T + 1, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H ** 0.5 * 2
    bias = torch.randn(V, generator=gen) * 0.5
    labels = _masked_labels(gen, S, T, V, variant=variant)
    return hidden, weight, bias, labels, gen


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def _sequence_logps(hidden, weight, bias, labels, token_weights, cache_budget_bytes):
    # hidden[:, :-1]: a strided view, as a model's output is sliced; shift, transforms, all extras
    out = dk.linear_sequence_logps(
        hidden[:, :-1], weight, labels, bias, shift=True, average=True, token_weights=token_weights,
        temperature=0.7, logit_scale=1.3, softcap=15.0, extras=EXTRAS, return_token_logps=True, chunk_size=128,
        cache_budget_bytes=cache_budget_bytes, backend="cpu",
    )
    return out


def _run_sequence_logps(fn, cache_budget_bytes, seed=0):
    hidden, weight, bias, labels, gen = _linear_inputs(seed=seed)
    token_weights = torch.rand(labels.shape, generator=gen) + 0.5
    grads = torch.randn(3, *labels.shape, generator=gen)
    leaves = _leaves(hidden, weight, bias, token_weights)
    out = fn(*leaves[:3], labels, leaves[3], cache_budget_bytes)
    loss = out.logps.sum() + (out.token_logps * grads[0]).sum() + (out.entropy * grads[1]).sum()
    return out, torch.autograd.grad(loss, leaves), (hidden, weight, bias, labels, token_weights)


@pytest.mark.parametrize("cache", [False, True], ids=["recompute", "cached"])
def test_compiled_linear_sequence_logps_matches_eager(cache):
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    budget = (1 << 30) if cache else 0
    compiled = torch.compile(_sequence_logps, fullgraph=True, backend="aot_eager")
    eager, eager_grads, inputs = _run_sequence_logps(_sequence_logps, budget)
    out, grads, _ = _run_sequence_logps(compiled, budget)
    for name in ("logps", "num_tokens", "token_logps") + EXTRAS:
        e, c = getattr(eager, name), getattr(out, name)
        assert c.dtype == e.dtype and c.shape == e.shape, name
        torch.testing.assert_close(c, e, **CLOSE, msg=name)
    for name, e, c in zip(("hidden", "weight", "bias", "token_weights"), eager_grads, grads):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6 * e.abs().max().item(), msg=name)
        assert e.abs().max() > 0, name
    # masked positions (prompt, padding, the all-masked row, the shifted-out last one) get nothing
    hidden_grad = grads[0][:, :-1]
    masked = torch.cat([inputs[3][:, 1:], torch.full_like(inputs[3][:, :1], -100)], dim=1) == -100
    assert torch.equal(hidden_grad[masked], torch.zeros_like(hidden_grad[masked]))
    assert torch.equal(grads[0][:, -1], torch.zeros_like(grads[0][:, -1]))
    # and the values are right, not merely equal to eager
    hidden, weight, bias, labels, token_weights = inputs
    ref = dk.reference.linear_sequence_logps(
        hidden[:, :-1].double(), weight.double(), labels, bias.double(), shift=True, average=True,
        token_weights=token_weights.double(), temperature=0.7, logit_scale=1.3, softcap=15.0,
        compute_dtype=torch.float64)
    torch.testing.assert_close(out.logps.double(), ref.logps, rtol=1e-5, atol=1e-5)


def _pref_inputs(B=3, T=7, H=16, V=300, seed=0, variant=0):
    hidden, weight, bias, labels, gen = _linear_inputs(2 * B, T, H, V, seed=seed, variant=variant)
    ref_hidden = hidden[:, :-1] + 0.3 * torch.randn(2 * B, T, H, generator=gen)
    return hidden, weight, bias, labels, ref_hidden


def _fused(hidden, weight, bias, labels, ref_hidden, mode):
    return dk.fused_linear_dpo_loss(
        hidden[:, :-1], weight, labels, bias, ref_hidden=ref_hidden, shift=True, softcap=20.0, chunk_size=128,
        backend="cpu", beta=0.2, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], use_weighting=True,
        ld_alpha=0.7, **MODES[mode],
    )


def _run_fused(fn, mode, seed=0, variant=0):
    hidden, weight, bias, labels, ref_hidden = _pref_inputs(seed=seed, variant=variant)
    leaves = _leaves(hidden, weight, bias)
    out = fn(*leaves, labels, ref_hidden, mode)
    return out, torch.autograd.grad(out.loss, leaves)


def _assert_same_loss(out, eager, grads, eager_grads, rtol=1e-6):
    assert isinstance(out, dk.DPOOutput)
    for name in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(out, name), getattr(eager, name), rtol=rtol, atol=rtol, msg=name)
    assert set(out.metrics) == set(eager.metrics)
    assert {"entropy", "logits/chosen", "mean_token_accuracy"} <= set(out.metrics)
    for name, value in eager.metrics.items():
        assert out.metrics[name] == pytest.approx(value, rel=rtol, abs=rtol), name
    for name, e, c in zip(("hidden", "weight", "bias"), eager_grads, grads):
        torch.testing.assert_close(c, e, rtol=rtol, atol=rtol * e.abs().max().item(), msg=name)
        assert e.abs().max() > 0, name


@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_fused_linear_dpo_loss_matches_eager(mode):
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(_fused, fullgraph=True, backend="aot_eager")
    eager, eager_grads = _run_fused(_fused, mode)
    out, grads = _run_fused(compiled, mode)
    _assert_same_loss(out, eager, grads, eager_grads)


def _plain_fused(hidden, weight, bias, labels, ref_hidden, mode):
    return dk.fused_linear_dpo_loss(hidden[:, :-1], weight, labels, bias, ref_hidden=ref_hidden, shift=True,
                                    chunk_size=128, backend="cpu", **MODES[mode])


def test_compiled_with_inductor():
    """The default backend: Inductor compiles the `[2B, T]` / `[B]` arithmetic around the ops (the
    default loss options: Inductor's compile time grows with the graph, on 2 shared cores)."""
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(_plain_fused, fullgraph=True)
    eager, eager_grads = _run_fused(_plain_fused, "recompute", seed=5)
    out, grads = _run_fused(compiled, "recompute", seed=5)
    # Inductor may reorder the fp32 sums of the small tensors: a few roundings, relative 1e-5
    _assert_same_loss(out, eager, grads, eager_grads, rtol=1e-5)


def test_compiled_module_reuses_its_graph_for_new_values_and_masks():
    """FusedLinearDPOLoss compiled once: new values with another mask (another number of scored
    tokens), then a batch with every position scored, run the same graph (no recompilation)."""
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters  # noqa: PLC0415

    counters.clear()
    module = dk.FusedLinearDPOLoss(shift=True, chunk_size=128, backend="cpu", beta=0.3, use_weighting=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")

    def run(fn, seed, variant, all_scored=False):
        hidden, weight, bias, labels, ref_hidden = _pref_inputs(seed=seed, variant=variant)
        if all_scored:
            labels = labels.clamp(min=0)  # shift still drops the last position of each row
        leaves = _leaves(hidden, weight, bias)
        out = fn(leaves[0][:, :-1], leaves[1], labels, leaves[2], ref_hidden=ref_hidden)
        return out, torch.autograd.grad(out.loss, leaves)

    first, _ = run(compiled, seed=1, variant=0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for seed, variant, all_scored in ((2, 1, False), (3, 0, True)):
        out, grads = run(compiled, seed, variant, all_scored)
        assert counters["stats"]["unique_graphs"] == graphs, "a new mask recompiled"
        assert not torch.equal(out.loss, first.loss)  # it did compute on the new values
        eager, eager_grads = run(module, seed, variant, all_scored)
        _assert_same_loss(out, eager, grads, eager_grads)


def test_out_of_range_label_under_compile_is_an_error_not_a_wrong_number():
    """While tracing, the labels cannot be read, so the caller's range check is skipped; the
    compaction op checks the scored targets when the compiled code runs."""
    require_backend("cpu", "cpu")
    torch._dynamo.reset()

    def fn(hidden, weight, labels):
        return dk.linear_sequence_logps(hidden, weight, labels, shift=True, backend="cpu").logps

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    hidden, weight, _, labels, _ = _linear_inputs()
    hidden = hidden[:, :-1]
    torch.testing.assert_close(compiled(hidden, weight, labels), fn(hidden, weight, labels), **CLOSE)
    labels[2, 4] = 300
    with pytest.raises(ValueError, match=r"target 300 of position \[2, 3\] \(after any shift\) is outside"):
        compiled(hidden, weight, labels)
