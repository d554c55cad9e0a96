"""Each loss type on two pairs whose values were worked out by hand.

Pairs: policy chosen [-10, -20], rejected [-12, -15]; reference chosen [-11, -19], rejected
[-11, -16]; so the log-ratios are u_c = [1, -1], u_r = [-1, 1], and with beta = 0.5 the reward
difference beta (u_c - u_r) is z = [1, -1]. Chosen lengths [2, 4], rejected [1, 2].
L(x) = -log sigmoid(x) = log(1 + e^-x).
"""

from __future__ import annotations

import math

import pytest
import torch

import dpo_kernels as dk

BETA = 0.5


def L(x):
    return math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def loss(loss_type, **options):
    f64 = dict(dtype=torch.float64)
    return dk.dpo_loss(
        torch.tensor([-10.0, -20.0], **f64), torch.tensor([-12.0, -15.0], **f64),
        torch.tensor([-11.0, -19.0], **f64), torch.tensor([-11.0, -16.0], **f64),
        beta=options.pop("beta", BETA), loss_type=loss_type,
        chosen_num_tokens=torch.tensor([2, 4]), rejected_num_tokens=torch.tensor([1, 2]), **options,
    )


def exo(z, eps):
    return sig(z) * (math.log(sig(z)) - math.log(1 - eps)) + sig(-z) * (math.log(sig(-z)) - math.log(eps))


def discopop(z, tau):
    w = sig(z / tau)
    return L(z) * (1 - w) + math.exp(-z) * w


SINH2 = 2 * math.sinh(1)  # forward_kl: s = 1 - e^-u, so s_c - s_r = [e - 1/e, 1/e - e]
EXPECTED = [
    ("sigmoid", {}, (L(1) + L(-1)) / 2),
    ("hinge", {}, (0 + 2) / 2),  # relu(1 - z)
    ("ipo", {}, ((1.5 - 1) ** 2 + (-0.75 - 1) ** 2) / 2),  # u_c/n_c - u_r/n_r = [1.5, -0.75]; 1/(2 beta) = 1
    ("exo_pair", {"label_smoothing": 0.1}, (exo(1, 0.1) + exo(-1, 0.1)) / 2),
    ("nca_pair", {}, L(0.5) + L(-0.5)),  # pair 1: 1.5 L(.5) + .5 L(-.5); pair 2 mirrored
    ("robust", {"label_smoothing": 0.25}, (L(1) + L(-1)) / 2),  # the flip terms cancel over these two pairs
    ("bco_pair", {}, L(0.5) + L(-0.5)),
    ("sppo_hard", {}, (0 + 8) / 2),  # (u_c - 1)^2 + (u_r + 1)^2 = [0, 8]
    ("aot", {}, (L(-1) + L(1)) / 2),  # sorted(pi_c - pi_r) - sorted(ref_c - ref_r) = [-5, 2] - [-3, 0]
    ("aot", {"label_smoothing": 0.5}, (L(-1) + L(1)) / 2),
    ("aot_unpaired", {"label_smoothing": 0.3}, math.log(2)),  # sorted u_c - sorted u_r = [0, 0]
    ("apo_zero", {}, 1.0),  # [2 - 2 sigmoid(.5), 2 sigmoid(.5)]
    ("apo_down", {}, 1.0),  # [sigmoid(.5) + 1 - sigmoid(1), sigmoid(-.5) + 1 - sigmoid(-1)]
    ("discopop", {"discopop_tau": 0.5}, (discopop(1, 0.5) + discopop(-1, 0.5)) / 2),
    ("sft", {}, 30 / 6),  # -(sum of chosen log-probs) / (chosen tokens)
    ("sigmoid_norm", {}, (L(0.75) + L(-0.375)) / 2),
    ("sigmoid", {"f_divergence_type": "forward_kl"}, (L(BETA * SINH2) + L(-BETA * SINH2)) / 2),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 2.0},
     (L(BETA * SINH2) + L(-BETA * SINH2)) / 2),  # a = 2: s = e^u - 1, the same differences
    ("hinge", {"f_divergence_type": "js_divergence", "beta": 10.0},
     (max(0.0, 1 - 10 * (math.log(sig(1)) - math.log(sig(-1))))
      + max(0.0, 1 - 10 * (math.log(sig(-1)) - math.log(sig(1))))) / 2),
    ("sigmoid", {"simpo_gamma": 0.25}, (L(0.75) + L(-1.25)) / 2),  # beta d - gamma
    ("sigmoid", {"label_smoothing": 0.4}, (L(1) + L(-1)) / 2),  # ignored, as TRL does
    (["sigmoid", "sppo_hard", "sft"], {"loss_weights": [2.0, 0.5, 0.1]}, (L(1) + L(-1)) + 2.0 + 0.5),
]


@pytest.mark.parametrize("loss_type, options, expected", EXPECTED,
                         ids=[f"{t}-{o}" for t, o, _ in EXPECTED])
def test_hand_worked_values(loss_type, options, expected):
    out = loss(loss_type, **options)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out.losses.mean().item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_rewards_and_reference_free():
    out = loss("sigmoid")
    assert out.chosen_rewards.tolist() == [0.5, -0.5] and out.rejected_rewards.tolist() == [-0.5, 0.5]
    free = dk.dpo_loss(torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0]), reference_free=True, beta=0.1)
    assert free.chosen_rewards.tolist() == pytest.approx([-1.0, -2.0])
    assert free.loss.item() == pytest.approx((L(0.2) + L(-0.5)) / 2, rel=1e-6)


def test_pair_weights_and_scalar_or_per_pair_chosen_nll():
    w = torch.tensor([3.0, 0.0], dtype=torch.float64)
    assert loss("hinge", pair_weights=w).loss.item() == 0.0  # pair 1 has hinge 0, pair 2 weight 0
    assert loss("sppo_hard", pair_weights=w.flip(0)).losses.tolist() == [0.0, 24.0]
    per_pair = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert loss("sft", chosen_nll=per_pair).loss.item() == 2.0
    assert loss("sft", chosen_nll=torch.tensor(7.0, dtype=torch.float64)).losses.tolist() == [7.0, 7.0]
    assert loss(["sigmoid", "sft"]).nll_loss.item() == 5.0
    assert loss("sigmoid").nll_loss is None
