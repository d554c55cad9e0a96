"""The per-pair formula of each loss type (TRL 1.16 `DPOTrainer` semantics), on `[B]` tensors.

Notation: `u_c, u_r` the chosen / rejected log-ratios `log pi - log pi_ref`; `s_c, s_r` their
f-divergence scores (`= u` for reverse_kl); `d = s_c - s_r - m` the score difference less the
SimPO margin `m = simpo_gamma / beta` (0 by default); `n_c, n_r` the completion lengths (at least 1);
`eps` = label_smoothing. Each function returns the `[B]` per-pair losses; the caller averages them.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class PairTerms(NamedTuple):
    """What the formulas read, all `[B]` (counts already clamped to >= 1, in the scores' dtype)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen_counts: Optional[torch.Tensor]
    rejected_counts: Optional[torch.Tensor]
    sft_losses: Optional[torch.Tensor]  # [B] sft term per pair
    beta: float
    margin: float  # simpo_gamma / beta
    label_smoothing: float
    discopop_tau: float


def _delta(t: PairTerms) -> torch.Tensor:
    return t.chosen_scores - t.rejected_scores - t.margin


def _normalised_delta(t: PairTerms) -> torch.Tensor:
    return t.chosen_scores / t.chosen_counts - t.rejected_scores / t.rejected_counts - t.margin


def sigmoid(t: PairTerms) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta d)."""
    return -F.logsigmoid(t.beta * _delta(t))


def hinge(t: PairTerms) -> torch.Tensor:
    """SLiC (Zhao et al. 2023): max(0, 1 - beta d)."""
    return torch.relu(1 - t.beta * _delta(t))


def ipo(t: PairTerms) -> torch.Tensor:
    """IPO (Azar et al. 2023), per-token normalised: (s_c/n_c - s_r/n_r - m - 1/(2 beta))^2."""
    return (_normalised_delta(t) - 1 / (2 * t.beta)) ** 2


def exo_pair(t: PairTerms) -> torch.Tensor:
    """EXO (Ji et al. 2024), K = 2: KL([sigmoid(z), sigmoid(-z)] || [1 - eps, eps]), z = beta d."""
    z = t.beta * _delta(t)
    eps = t.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair(t: PairTerms) -> torch.Tensor:
    """NCA (Chen et al. 2024): -log sigmoid(beta u_c) - 1/2 log sigmoid(-beta u_c) - 1/2 log sigmoid(-beta u_r)."""
    chosen, rejected = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def robust(t: PairTerms) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): ((1 - eps) L(d) - eps L(-d)) / (1 - 2 eps), L(x) = -log sigmoid(beta x)."""
    z = t.beta * _delta(t)
    eps = t.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def bco_pair(t: PairTerms) -> torch.Tensor:
    """BCO, paired (Jung et al. 2024), without the running reward shift:
    -log sigmoid(beta u_c) - log sigmoid(-beta u_r)."""
    return -F.logsigmoid(t.beta * t.chosen_logratios) - F.logsigmoid(-t.beta * t.rejected_logratios)


def sppo_hard(t: PairTerms) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024): (u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2."""
    return (t.chosen_logratios - 0.5 / t.beta) ** 2 + (t.rejected_logratios + 0.5 / t.beta) ** 2


def _smoothed_logistic(delta: torch.Tensor, t: PairTerms) -> torch.Tensor:
    eps = t.label_smoothing
    return -F.logsigmoid(t.beta * delta) * (1 - eps) - F.logsigmoid(-t.beta * delta) * eps


def aot(t: PairTerms) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024): the smoothed logistic loss of sorted(pi_c - pi_r) - sorted(ref_c - ref_r)
    (sorted over the batch: element i is the i-th quantile, not pair i)."""
    policy, _ = torch.sort(t.chosen_logps - t.rejected_logps, dim=0)
    ref, _ = torch.sort(t.ref_chosen_logps - t.ref_rejected_logps, dim=0)
    return _smoothed_logistic(policy - ref, t)


def aot_unpaired(t: PairTerms) -> torch.Tensor:
    """AOT, unpaired: the smoothed logistic loss of sorted(u_c) - sorted(u_r)."""
    chosen, _ = torch.sort(t.chosen_logratios, dim=0)
    rejected, _ = torch.sort(t.rejected_logratios, dim=0)
    return _smoothed_logistic(chosen - rejected, t)


def apo_zero(t: PairTerms) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): 1 - sigmoid(beta u_c) + sigmoid(beta u_r)."""
    return 1 - torch.sigmoid(t.beta * t.chosen_logratios) + torch.sigmoid(t.beta * t.rejected_logratios)


def apo_down(t: PairTerms) -> torch.Tensor:
    """APO-down: sigmoid(beta u_c) + 1 - sigmoid(beta (u_c - u_r))."""
    return (torch.sigmoid(t.beta * t.chosen_logratios)
            + 1 - torch.sigmoid(t.beta * (t.chosen_logratios - t.rejected_logratios)))


def discopop(t: PairTerms) -> torch.Tensor:
    """DiscoPOP (Lu et al. 2024), z = beta d, w = sigmoid(z / tau): (1 - w) (-log sigmoid(z)) + w exp(-z)."""
    z = t.beta * _delta(t)
    w = torch.sigmoid(z / t.discopop_tau)
    return -F.logsigmoid(z) * (1 - w) + torch.exp(-z) * w


def sft(t: PairTerms) -> torch.Tensor:
    """The NLL of the chosen completions (RPO's term, Pang et al. 2024), as given by the caller."""
    return t.sft_losses


def sigmoid_norm(t: PairTerms) -> torch.Tensor:
    """Length-normalised DPO: -log sigmoid(beta (s_c/n_c - s_r/n_r - m)); with reference_free and simpo_gamma,
    SimPO (Meng et al. 2024)."""
    return -F.logsigmoid(t.beta * _normalised_delta(t))


PAIR_LOSSES = {
    "sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "robust": robust, "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot,
    "aot_unpaired": aot_unpaired, "apo_zero": apo_zero, "apo_down": apo_down,
    "discopop": discopop, "sft": sft, "sigmoid_norm": sigmoid_norm,
}
