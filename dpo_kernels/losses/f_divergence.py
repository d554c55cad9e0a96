"""f-DPO: the score each policy/reference log-ratio enters the pairwise losses as.

For a divergence with generator f, the implicit reward is f'(pi / pi_ref) (up to a per-prompt
constant that cancels in chosen - rejected), with `u = log(pi / pi_ref)`:

    reverse_kl        u                              (standard DPO)
    forward_kl        1 - exp(-u)
    js_divergence     log 2 + log sigmoid(u)
    alpha_divergence  (exp((a - 1) u) - 1) / (a - 1),  a = f_alpha_divergence_coef; u itself when |a - 1| < 1e-6

As in TRL 1.16, alpha_divergence clamps `(a - 1) u` from above before the exponential (at 11 for
float16, 80 otherwise) and evaluates the exponential in float32 (float64 for float64 inputs, where
TRL has no rule and fails); the gradient is zero past the clamp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# the alpha-divergence limit a -> 1 is reverse_kl; TRL switches over within this distance
ALPHA_ONE_TOLERANCE = 1e-6


def _alpha_exponent_cap(dtype: torch.dtype) -> float:
    return 11.0 if dtype == torch.float16 else 80.0


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """`[B]` scores from `[B]` log-ratios `log pi - log pi_ref`; differentiable."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < ALPHA_ONE_TOLERANCE:
            return logratios
        exponent = (alpha - 1.0) * logratios
        dtype = exponent.dtype
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        grown = torch.exp(exponent.to(wide).clamp(max=_alpha_exponent_cap(dtype))) - 1.0
        return grown.to(dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"f_divergence_type: unknown value {f_divergence_type!r}")
