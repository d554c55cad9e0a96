"""The DPO loss family on per-sequence log-probs: pure functions of `[B]` tensors, never `[N, V]`."""

from .dpo_loss import dpo_loss
from .metrics import dpo_metric_tensors
from .options import F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCE_TYPES, LOSS_TYPES, check_loss_options

__all__ = [
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "LOSS_TYPES",
    "check_loss_options",
    "dpo_loss",
    "dpo_metric_tensors",
]
