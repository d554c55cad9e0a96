"""The output embedding of a Hugging Face causal LM as the linear path needs it: last hidden states
from the backbone, and the lm_head's weight, bias and logit transforms, without building logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class OutputHead:
    """logits = softcap(logit_scale * (hidden @ weight.T + bias)). `weight` is the model's own
    parameter (tied to the input embedding when the model ties them), never a copy."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    logit_scale: float
    softcap: Optional[float]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_head(model) -> OutputHead:
    """The lm_head of `model`, with the transforms its config declares: `logit_scale` (Cohere,
    multiplied), `logits_scaling` (Granite, divided) and `final_logit_softcapping` (Gemma 2/3).
    `check_output_head` verifies the result against the model's own logits."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"model {type(model).__name__} has no output embedding (get_output_embeddings() "
                         "returned no module with a weight): it is not a causal LM the trainer can score")
    config = _text_config(model)
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(weight=head.weight, bias=getattr(head, "bias", None),
                      logit_scale=1.0 if scale is None else float(scale),
                      softcap=None if softcap is None else float(softcap))


def last_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[rows, T, H]` hidden states after the backbone's final norm: what the lm_head would read.
    The backbone runs alone; the model's own lm_head (and its `[rows, T, V]` logits) never runs."""
    backbone = model.base_model
    if backbone is model:
        raise ValueError(f"model {type(model).__name__} exposes no backbone (base_model is the model itself); "
                         "the trainer needs the hidden states before the lm_head")
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def check_output_head(model, head: OutputHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Compare `head` applied to the backbone's hidden states with the model's own logits on a few
    tokens; a model whose lm_head applies a transform not covered by `output_head` is refused
    instead of being trained on the wrong log-probs."""
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        hidden = last_hidden_states(model, input_ids, attention_mask).float()
    finally:
        model.train(was_training)
    ours = hidden @ head.weight.float().T
    if head.bias is not None:
        ours = ours + head.bias.float()
    ours = ours * head.logit_scale
    if head.softcap is not None:
        ours = torch.tanh(ours / head.softcap) * head.softcap
    err = (ours - logits).abs().max().item()
    tolerance = 1e-3 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2  # 16-bit GEMM rounding
    bound = tolerance * (1.0 + logits.abs().max().item())
    if not err <= bound:
        raise ValueError(
            f"model {type(model).__name__}: its logits differ from lm_head(hidden states) with logit_scale="
            f"{head.logit_scale} and softcap={head.softcap} by {err:.3g}; its output head applies a transform "
            "the trainer does not know, so it cannot be trained through the linear path"
        )
