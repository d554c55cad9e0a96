"""The loss options of `dk.dpo_loss`: their names, which loss types use which, and their validation.

Every check here runs on Python values and tensor shapes only (no device sync), so it also runs
while `torch.compile` traces. Each error names the option at fault.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

# TRL 1.16 DPOTrainer's loss types, in its order.
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types TRL allows a non-default f_divergence_type with: those built on the difference of
# the chosen and rejected scores (plus sft, which ignores it).
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# The loss types that read label_smoothing (TRL's sigmoid does not).
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"exo_pair", "robust", "aot", "aot_unpaired"})
# The loss types whose preference margin simpo_gamma / beta shifts (sft has no margin and is
# unaffected); the others reject a nonzero simpo_gamma.
MARGIN_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"})
# The loss types that divide the scores by the completion lengths.
LENGTH_NORMALISED_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})
# The loss types that sort over the batch, so that their per-element losses are not per pair.
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})


class LossOptions(NamedTuple):
    """Validated options: loss types as a tuple, weights as floats, numbers as floats."""

    loss_types: Tuple[str, ...]
    loss_weights: Tuple[float, ...]
    beta: float
    label_smoothing: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    discopop_tau: float
    simpo_gamma: float
    reference_free: bool


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def normalise_loss_types(loss_type: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    names = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (list, tuple)) or len(names) == 0:
        raise ValueError(f"loss_type must be a loss type name or a non-empty list of them, got {loss_type!r}")
    for name in names:
        if name not in LOSS_TYPES:
            raise ValueError(f"loss_type: unknown loss type {name!r}; expected one of {list(LOSS_TYPES)}")
    return tuple(names)


def normalise_loss_weights(loss_weights: Optional[Sequence[float]], count: int) -> Tuple[float, ...]:
    if loss_weights is None:
        return (1.0,) * count
    if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
        raise TypeError(f"loss_weights must be a list of numbers or None, got {type(loss_weights).__name__}")
    if len(loss_weights) != count:
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries but loss_type has {count} loss types; "
            "give one weight per loss type"
        )
    return tuple(_real(f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights))


def check_loss_options(
    *,
    beta=0.1,
    loss_type="sigmoid",
    loss_weights=None,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    simpo_gamma=0.0,
    reference_free=False,
) -> LossOptions:
    """Validate the non-tensor options of `dk.dpo_loss` (ValueError/TypeError naming the option)."""
    types = normalise_loss_types(loss_type)
    weights = normalise_loss_weights(loss_weights, len(types))
    beta = _real("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = _real("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps}")
    if "exo_pair" in types and not 0.0 < eps < 1.0:
        raise ValueError(
            f"label_smoothing must be in (0, 1) with loss_type 'exo_pair' (EXO's epsilon; the paper "
            f"suggests 1e-3), got {eps}"
        )
    if "robust" in types and not eps < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) with loss_type 'robust' (the probability that a "
            f"preference label is flipped), got {eps}"
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl":
        outside = sorted(set(types) - F_DIVERGENCE_LOSS_TYPES)
        if outside:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is not defined for loss type(s) {outside}: only "
                f"{sorted(F_DIVERGENCE_LOSS_TYPES)} accept a value other than 'reverse_kl'"
            )
    alpha = _real("f_alpha_divergence_coef", f_alpha_divergence_coef)
    tau = _real("discopop_tau", discopop_tau)
    if tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {tau}")
    gamma = _real("simpo_gamma", simpo_gamma)
    if gamma != 0.0:
        outside = sorted(set(types) - MARGIN_LOSS_TYPES - {"sft"})
        if outside:
            raise ValueError(
                f"simpo_gamma (a target margin) is not defined for loss type(s) {outside}: only "
                f"{sorted(MARGIN_LOSS_TYPES)} (and sft, which has no margin) accept a nonzero value"
            )
    if not isinstance(reference_free, bool):
        raise TypeError(f"reference_free must be a bool, got {type(reference_free).__name__}")
    return LossOptions(types, weights, beta, eps, f_divergence_type, alpha, tau, gamma, reference_free)


def check_pair_tensor(
    name: str,
    value,
    batch: int,
    device: torch.device,
    *,
    floating: bool = True,
    allow_scalar: bool = False,
    device_of: str = "chosen_logps",
) -> None:
    """`value` is a `[batch]` tensor (or 0-dim, with `allow_scalar`) on `device` (that of the
    tensor named `device_of`); floating point, or (with `floating=False`) any integer or floating
    dtype but bool."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not floating and (value.dtype == torch.bool or value.dtype.is_complex):
        raise TypeError(f"{name} must be an integer or floating-point tensor, got {value.dtype}")
    shapes_ok = value.shape == (batch,) or (allow_scalar and value.dim() == 0)
    if not shapes_ok:
        expected = f"[{batch}]" + (" or a scalar" if allow_scalar else "")
        raise ValueError(f"{name} must have shape {expected} (one entry per pair), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but {device_of} is on {device}")


def check_pair_weights_loss_types(loss_types: Sequence[str]) -> None:
    sorting = sorted(set(loss_types) & SORTING_LOSS_TYPES)
    if sorting:
        raise ValueError(
            f"pair_weights cannot be used with loss type(s) {sorting}: they sort over the batch, "
            "so their per-element losses are not per pair"
        )
