"""The MoE router load-balancing loss, added to the DPO loss as TRL 1.16's `DPOTrainer` adds it:
`loss = dpo_loss + router_aux_loss_coef * aux_loss`, where `aux_loss` is what the model's own
forward returns with `output_router_logits=True` (computed over the policy's chosen and rejected
rows together) and the coefficient is the (text) config's `router_aux_loss_coef`. It applies to
models whose config has `output_router_logits` (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, Jamba,
Qwen3-Next, MiniMax, ...) and a non-zero coefficient; the reference model never computes it.
"""

from __future__ import annotations

import warnings

import torch

from .output_head import hidden_states_from_root, text_config


def router_aux_loss_coef(model) -> float:
    """The coefficient TRL would use (0.0: no aux loss for this model)."""
    config = text_config(model)
    if not hasattr(config, "output_router_logits"):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def hidden_states_and_router_aux_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(`[rows, T, H]` last hidden states, the model's scalar router aux loss) from its full forward
    with `output_router_logits=True` and no logits built. The aux loss is None (with a warning)
    when the forward returns none although the config declares router logits (Llama-4, whose
    TRL training then fails on the missing `aux_loss`)."""
    hidden, out = hidden_states_from_root(model, input_ids, attention_mask, output_router_logits=True)
    aux_loss = getattr(out, "aux_loss", None)
    if not isinstance(aux_loss, torch.Tensor):
        warnings.warn(f"model {type(model).__name__}: its config declares output_router_logits and "
                      f"router_aux_loss_coef={router_aux_loss_coef(model)}, but its forward returns no aux_loss; "
                      "training without a router aux loss", stacklevel=2)
        aux_loss = None
    return hidden, aux_loss


def add_router_aux_loss(out, aux_loss: torch.Tensor, coef: float):
    """`out` (a `DPOOutput`) with `coef * aux_loss` added to its loss, and `aux_loss` in its metrics."""
    aux_loss = aux_loss.to(out.loss.device, out.loss.dtype)
    return out._replace(loss=out.loss + coef * aux_loss,
                        metric_tensors={**out.metric_tensors, "aux_loss": aux_loss.detach()})
