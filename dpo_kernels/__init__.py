"""dpo_kernels: fused, memory-lean log-probabilities and losses for DPO-family preference training.

    import dpo_kernels as dk
    out = dk.sequence_logps(logits, labels, shift=True)   # out.logps: [S] per-sequence log-probs

See README.md to start, docs/ for the API and the design (docs/design.md), and
`python -m dpo_kernels.info` for what is usable on this machine.
"""

from . import reference
from .backends.availability import BackendUnavailableError, available_backends
from .linear.linear_sequence_logps import linear_sequence_logps
from .logits.sequence_logps import sequence_logps
from .losses import dpo_loss
from .losses.fused_dpo_loss import fused_dpo_loss
from .losses.fused_linear_dpo_loss import fused_linear_dpo_loss
from .losses.modules import FusedDPOLoss, FusedLinearDPOLoss
from .outputs import DPOLossOutput, DPOOutput, LogpsOutput

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DPOLossOutput",
    "DPOOutput",
    "FusedDPOLoss",
    "FusedLinearDPOLoss",
    "LogpsOutput",
    "available_backends",
    "dpo_loss",
    "fused_dpo_loss",
    "fused_linear_dpo_loss",
    "linear_sequence_logps",
    "reference",
    "sequence_logps",
    "__version__",
]
