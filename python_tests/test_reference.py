"""The oracle itself: `dk.reference` against sums written out by hand with Python's `math`, so that
the conventions every other test inherits from it (shift, weights alignment, average, masking,
2-D inputs) are pinned independently."""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels import reference

IGN = -100


def _logsoftmax_at(row, target):
    m = max(row)
    return row[target] - (m + math.log(sum(math.exp(v - m) for v in row)))


def _hand(logits, labels, weights=None, shift=False, average=False, ignore_index=IGN):
    """Per-sequence (logps, num_tokens, token_logps) from nested lists, in plain Python."""
    out = []
    for s, rows in enumerate(logits):
        T = len(rows)
        token = [0.0] * T
        total, n = 0.0, 0
        for t in range(T):
            j = t + 1 if shift else t  # index of the label that is the target of position t
            if j >= T or labels[s][j] == ignore_index:
                continue
            lp = _logsoftmax_at(rows[t], labels[s][j])
            token[t] = lp
            total += lp * (1.0 if weights is None else weights[s][j])
            n += 1
        if average:
            total = total / n if n else 0.0
        out.append((total, n, token))
    return out


def _random(S, T, V, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, T, V, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (S, T), generator=gen)
    labels[torch.rand(S, T, generator=gen) < 0.3] = IGN
    weights = torch.rand(S, T, generator=gen, dtype=torch.float64) * 2 - 0.5
    return logits, labels, weights


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_matches_hand_computation(shift, average, weighted):
    logits, labels, weights = _random(3, 6, 7, seed=1)
    labels[2] = IGN  # an all-masked sequence
    w = weights if weighted else None
    ref = reference.sequence_logps(logits, labels, shift=shift, average=average, token_weights=w,
                                   compute_dtype=torch.float64)
    hand = _hand(logits.tolist(), labels.tolist(), None if w is None else w.tolist(), shift, average)
    for s, (total, n, token) in enumerate(hand):
        assert ref.num_tokens[s].item() == n
        assert ref.logps[s].item() == pytest.approx(total, rel=1e-12, abs=1e-12)
        assert ref.token_logps[s].tolist() == pytest.approx(token, rel=1e-12, abs=1e-12)
    assert ref.logps[2].item() == 0.0 and ref.num_tokens[2].item() == 0
    assert ref.logps.dtype == torch.float64 and ref.num_tokens.dtype == torch.int64


def test_shift_targets_the_next_label_and_masks_the_last_position():
    logits = torch.randn(1, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[IGN, 1, 2, 3]])
    ref = reference.sequence_logps(logits, labels, shift=True, compute_dtype=torch.float64)
    logp = torch.log_softmax(logits[0], -1)
    expected = torch.stack([logp[0, 1], logp[1, 2], logp[2, 3], torch.zeros((), dtype=torch.float64)])
    torch.testing.assert_close(ref.token_logps[0], expected, rtol=0, atol=1e-15)
    assert ref.num_tokens.tolist() == [3]


def test_weights_are_label_aligned_under_shift():
    logits, labels, _ = _random(1, 5, 6, seed=2)
    labels[:] = torch.tensor([[IGN, 1, 2, 3, 4]])
    weights = torch.tensor([[100.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)  # weights[0] never used
    ref = reference.sequence_logps(logits, labels, shift=True, token_weights=weights, compute_dtype=torch.float64)
    expected = sum(ref.token_logps[0, t] * weights[0, t + 1] for t in range(4))
    assert ref.logps[0].item() == pytest.approx(expected.item(), rel=1e-14)


def test_unbatched_input_is_one_sequence():
    logits, labels, weights = _random(1, 6, 9, seed=3)
    batched = reference.sequence_logps(logits, labels, shift=True, token_weights=weights, compute_dtype=torch.float64)
    flat = reference.sequence_logps(logits[0], labels[0], shift=True, token_weights=weights[0],
                                    compute_dtype=torch.float64)
    assert flat.logps.shape == (1,) and flat.num_tokens.shape == (1,) and flat.token_logps.shape == (6,)
    assert torch.equal(flat.logps, batched.logps) and torch.equal(flat.token_logps, batched.token_logps[0])


def test_reference_gradient_is_g_times_onehot_minus_softmax():
    logits, labels, _ = _random(2, 5, 8, seed=4)
    x = logits.clone().requires_grad_()
    ref = reference.sequence_logps(x, labels, compute_dtype=torch.float64)
    g = torch.randn(2, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ref.token_logps * g).sum(), x)
    valid = labels != IGN
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 8).double()
    expected = (g * valid)[..., None] * (onehot - torch.softmax(logits, -1))
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_default_compute_dtype_is_float32_and_low_precision_inputs_are_upcast():
    logits, labels, _ = _random(2, 4, 10, seed=5)
    ref32 = reference.sequence_logps(logits.to(torch.bfloat16), labels)
    assert ref32.logps.dtype == torch.float32 and ref32.token_logps.dtype == torch.float32
    ref64 = reference.sequence_logps(logits.to(torch.bfloat16), labels, compute_dtype=torch.float64)
    torch.testing.assert_close(ref32.logps.double(), ref64.logps, rtol=1e-5, atol=1e-5)


def test_reference_backend_of_the_api_is_the_oracle():
    logits, labels, weights = _random(2, 6, 11, seed=6)
    api = dk.sequence_logps(logits, labels, shift=True, average=True, token_weights=weights,
                            return_token_logps=True, backend="reference")
    ref = reference.sequence_logps(logits, labels, shift=True, average=True, token_weights=weights,
                                   compute_dtype=torch.float64)
    assert torch.equal(api.logps, ref.logps) and torch.equal(api.token_logps, ref.token_logps)


def test_reference_imports_nothing_from_the_package():
    """docs/design.md section 2: reference.py stands apart, so that it stays an independent oracle."""
    tree = ast.parse(inspect.getsource(reference))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("dpo_kernels"), ast.dump(node)
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("dpo_kernels") for a in node.names), ast.dump(node)
