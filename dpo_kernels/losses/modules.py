"""`nn.Module` wrappers of the drop-in loss calls: they hold the options, `forward` takes the batch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..outputs import DPOOutput
from ..validation import check_backend_name, check_bool, check_int
from .dpo_from_logps import check_fused_options
from .fused_dpo_loss import fused_dpo_loss
from .fused_linear_dpo_loss import fused_linear_dpo_loss


class FusedDPOLoss(nn.Module):
    """`dk.fused_dpo_loss` with fixed options: `FusedDPOLoss(beta=0.1, loss_type="ipo")(logits, labels, ...)`.

    Options (checked here, at construction): `ignore_index`, `shift`, `backend`, `inplace_backward`, the vocabulary-parallel
    `process_group` / `vocab_start` / `vocab_end`, and the loss options of `dk.fused_dpo_loss` except `pair_weights`, which is per batch and goes to `forward`.
    The module has no parameters or buffers.
    """

    def __init__(self, *, ignore_index: int = -100, shift: bool = False, backend: str = "auto",
                 inplace_backward: bool = False, process_group=None, vocab_start: Optional[int] = None,
                 vocab_end: Optional[int] = None, **loss_options):
        super().__init__()
        if "pair_weights" in loss_options:
            raise TypeError("FusedDPOLoss() takes pair_weights in forward(), not as an option: it is per batch")
        check_int("ignore_index", ignore_index)
        check_bool("shift", shift)
        check_backend_name(backend)
        check_fused_options(loss_options, "FusedDPOLoss")
        check_bool("inplace_backward", inplace_backward)
        self.ignore_index = ignore_index
        self.shift = shift
        self.backend = backend
        self.inplace_backward = inplace_backward
        self.vocab_parallel = dict(process_group=process_group, vocab_start=vocab_start, vocab_end=vocab_end)
        self.loss_options = dict(loss_options)

    def forward(
        self,
        policy_logits: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen_logps: Optional[torch.Tensor] = None,
        ref_rejected_logps: Optional[torch.Tensor] = None,
        ref_logits: Optional[torch.Tensor] = None,
        pair_weights: Optional[torch.Tensor] = None,
    ) -> DPOOutput:
        return fused_dpo_loss(
            policy_logits, labels, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            ref_logits=ref_logits, ignore_index=self.ignore_index, shift=self.shift, backend=self.backend,
            inplace_backward=self.inplace_backward, pair_weights=pair_weights, **self.vocab_parallel, **self.loss_options,
        )

    def extra_repr(self) -> str:
        options = {"ignore_index": self.ignore_index, "shift": self.shift, "backend": self.backend,
                   "inplace_backward": self.inplace_backward}
        options.update(self.loss_options)
        return ", ".join(f"{k}={v!r}" for k, v in options.items())


class FusedLinearDPOLoss(nn.Module):
    """`dk.fused_linear_dpo_loss` with fixed options:
    `FusedLinearDPOLoss(beta=0.1, softcap=30.0)(hidden, lm_head.weight, labels, ...)`.

    Options (checked here, at construction): `ignore_index`, `shift`, `temperature`,
    `logit_scale`, `softcap`, `chunk_size`, `cache_budget_bytes`, `backend`, the vocabulary-parallel
    `process_group` / `vocab_start` / `vocab_end` / `reduce_hidden_grad`, `eager_backward`, and the
    loss options of `dk.fused_linear_dpo_loss` except `pair_weights` (per batch: a `forward`
    argument). The module
    has no parameters: the lm_head weight is passed to `forward`, so it stays the model's.
    """

    def __init__(self, *, ignore_index: int = -100, shift: bool = False, temperature: float = 1.0,
                 logit_scale: float = 1.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 cache_budget_bytes: int = 0, backend: str = "auto", process_group=None,
                 vocab_start: Optional[int] = None, vocab_end: Optional[int] = None,
                 reduce_hidden_grad: bool = True, eager_backward: bool = False, **loss_options):
        super().__init__()
        if "pair_weights" in loss_options:
            raise TypeError("FusedLinearDPOLoss() takes pair_weights in forward(), not as an option: it is per batch")
        check_int("ignore_index", ignore_index)
        check_bool("shift", shift)
        check_bool("eager_backward", eager_backward)
        check_backend_name(backend)
        check_fused_options(loss_options, "FusedLinearDPOLoss")
        self.linear_options = dict(ignore_index=ignore_index, shift=shift, temperature=temperature,
                                   logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size,
                                   cache_budget_bytes=cache_budget_bytes, backend=backend,
                                   process_group=process_group, vocab_start=vocab_start, vocab_end=vocab_end,
                                   reduce_hidden_grad=reduce_hidden_grad, eager_backward=eager_backward)
        self.loss_options = dict(loss_options)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        ref_chosen_logps: Optional[torch.Tensor] = None,
        ref_rejected_logps: Optional[torch.Tensor] = None,
        ref_hidden: Optional[torch.Tensor] = None,
        ref_weight: Optional[torch.Tensor] = None,
        ref_bias: Optional[torch.Tensor] = None,
        pair_weights: Optional[torch.Tensor] = None,
    ) -> DPOOutput:
        return fused_linear_dpo_loss(
            hidden, weight, labels, bias, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, pair_weights=pair_weights,
            **self.linear_options, **self.loss_options,
        )

    def extra_repr(self) -> str:
        options = dict(self.linear_options)
        options.update(self.loss_options)
        return ", ".join(f"{k}={v!r}" for k, v in options.items())
