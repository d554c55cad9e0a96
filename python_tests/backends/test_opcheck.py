"""`torch.library.opcheck` on every custom op of the package (docs/design.md: each entry point is a
`torch.library` custom op with a fake implementation): the schema matches what the implementation
mutates and returns (no aliasing), the fake gives the real outputs' shapes, dtypes and strides
(unbacked sizes included), the autograd registration is right, and AOT dispatch traces the op.
Small CPU inputs, the C++ CPU kernels."""

from __future__ import annotations

import json

import pytest
import torch

import dpo_kernels  # noqa: F401  (registers the ops)
from dpo_kernels.backends.availability import unavailable_reason
from dpo_kernels.linear import linear_token_logps_op, scored_positions_op  # noqa: F401
from dpo_kernels.losses import eager_linear_dpo_loss  # noqa: F401
from dpo_kernels.logits import token_logps_op  # noqa: F401

OPS = torch.ops.dpo_kernels
S, T, H, V = 2, 5, 8, 300
EXTRAS = "entropy,mean_logits,is_top1,log_sum_sq_probs"


@pytest.fixture(autouse=True)
def _cpu_backend():
    reason = unavailable_reason("cpu", torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def _labels(seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (S, T), generator=gen)
    labels[0, :2] = -100  # prompt
    labels[1, -1] = -100  # padding
    return labels


def _linear_inputs(dtype=torch.float32, requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(7, H, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    weight = (torch.randn(V, H, generator=gen, dtype=dtype) / H ** 0.5).requires_grad_(requires_grad)
    bias = torch.randn(V, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    targets = torch.randint(0, V, (7,), generator=gen)
    return hidden, weight, bias, targets


def _linear_options(cache_budget_bytes=0, extras=EXTRAS, compute_dtype=torch.float32):
    # backend, pre_scale, softcap, post_scale, chunk_size, cache_budget_bytes, compute_dtype, extras,
    # vocab_size, group_name, reduce_hidden_grad
    return ("cpu", 1.5, 20.0, 0.5, 128, cache_budget_bytes, compute_dtype, extras, V, None, False)


@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_token_logps_ops(inplace):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(S, T, V, generator=gen, requires_grad=True)
    labels = _labels()
    torch.library.opcheck(OPS.token_logps, (logits, labels, -100, "cpu", inplace))
    with torch.no_grad():
        _, row_stats = OPS.token_logps(logits, labels, -100, "cpu", inplace)
    grad = torch.randn(S, T, generator=gen)
    backward = OPS.token_logps_backward_ if inplace else OPS.token_logps_backward
    torch.library.opcheck(backward, (logits.detach().clone(), labels, row_stats, grad, -100, "cpu"))


@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_token_logps_extras_ops(inplace):
    """The extras forward, and both backward ops with the entropy term (entropy_grad, entropy)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(S, T, V, generator=gen, requires_grad=True)
    labels = _labels()
    torch.library.opcheck(OPS.token_logps_extras, (logits, labels, -100, "cpu", inplace))
    with torch.no_grad():
        _, row_stats, entropy, _, _, _ = OPS.token_logps_extras(logits, labels, -100, "cpu", inplace)
    grad = torch.randn(S, T, generator=gen)
    entropy_grad = torch.randn(S, T, generator=gen)
    backward = OPS.token_logps_backward_ if inplace else OPS.token_logps_backward
    torch.library.opcheck(backward, (logits.detach().clone(), labels, row_stats, grad, -100, "cpu", entropy_grad,
                                     entropy))


@pytest.mark.parametrize("all_scored", [False, True], ids=["masked", "all-scored"])
def test_scored_positions(all_scored):
    labels = _labels() if not all_scored else torch.randint(0, V, (S, T))
    torch.library.opcheck(OPS.scored_positions, (labels, -100, V))
    positions = OPS.scored_positions(labels, -100, V)
    assert torch.equal(positions, torch.stack((labels != -100).nonzero(as_tuple=True)))
    labels[1, 2] = V
    with pytest.raises(ValueError, match=r"target 300 of position \[1, 2\] .* outside \[0, 300\)"):
        OPS.scored_positions(labels, -100, V)


@pytest.mark.parametrize("cache,extras", [(False, EXTRAS), (True, EXTRAS), (False, "")],
                         ids=["recompute-extras", "cached-extras", "recompute-plain"])
def test_linear_token_logps(cache, extras):
    """The forward op, and its autograd registration. Its last output, the cache, is overwritten by
    the backward op: AOT dispatch is checked on the forward alone (inputs without grad), since
    opcheck's AOT test returns every output from the traced graph, the cache included, which the
    library never does (python_tests/linear/test_linear_compile.py traces the real use, backward too)."""
    options = _linear_options(1 << 30 if cache else 0, extras)
    for requires_grad in (True, False):
        hidden, weight, bias, targets = _linear_inputs(requires_grad=requires_grad)
        utils = ("test_schema", "test_autograd_registration", "test_faketensor") if requires_grad else None
        for b in (bias, None):
            torch.library.opcheck(OPS.linear_token_logps, (hidden, weight, b, targets, *options),
                                  **({"test_utils": utils} if utils else {}))
    out = OPS.linear_token_logps(hidden, weight, bias, targets, *options)
    assert out[-1].numel() == (hidden.shape[0] * V if cache else 0)  # the cache, when used


@pytest.mark.parametrize("cache", [False, True], ids=["recompute", "cached"])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False)],
                         ids=["all", "hidden", "weight"])
def test_linear_token_logps_backward(cache, needs):
    hidden, weight, bias, targets = _linear_inputs(requires_grad=False)
    options = _linear_options(1 << 30 if cache else 0)
    token_logps, row_stats, entropy, *_, tiles = OPS.linear_token_logps(hidden, weight, bias, targets, *options)
    gen = torch.Generator().manual_seed(3)
    grad, entropy_grad = torch.randn(2, hidden.shape[0], generator=gen)
    args = (hidden, weight, bias, targets, row_stats, grad, entropy, entropy_grad, tiles, *needs, *options)
    torch.library.opcheck(OPS.linear_token_logps_backward, args)


def test_eager_linear_dpo_gradients():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2 * S, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H ** 0.5
    bias = torch.randn(V, generator=gen)
    labels = torch.cat([_labels(), _labels(seed=1)])
    ref_chosen, ref_rejected = -torch.rand(2, S, generator=gen) * 10
    linear = dict(ignore_index=-100, shift=False, temperature=1.0, logit_scale=1.0, softcap=None, chunk_size=128,
                  backend="cpu")
    options = json.dumps({"linear": linear, "loss": {"beta": 0.2, "loss_type": "ipo", "use_weighting": True}})
    args = (hidden, weight, bias, labels, ref_chosen, ref_rejected, None, torch.tensor([0.5, 2.0]), options,
            "entropy,mean_logits,is_top1,log_sum_sq_probs", True, 1 << 12, True, True, True)
    torch.library.opcheck(OPS.eager_linear_dpo_gradients, args)


def test_every_custom_op_of_the_package_is_checked_here():
    """A new op must come with an opcheck case in this file."""
    checked = {"token_logps", "token_logps_extras", "token_logps_backward", "token_logps_backward_", "scored_positions",
               "linear_token_logps", "linear_token_logps_backward", "eager_linear_dpo_gradients"}
    registered = {name for name in dir(OPS) if not name.startswith("_") and isinstance(getattr(OPS, name),
                                                                                        torch._ops.OpOverloadPacket)}
    assert registered == checked
