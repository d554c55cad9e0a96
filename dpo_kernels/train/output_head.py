"""The output embedding of a Hugging Face causal LM as the linear path needs it: last hidden states
from the backbone, and the lm_head's weight, bias and logit transforms, without building logits.

What the trainer needs from a model, found through its own API:
- the backbone: `model.base_model` (the module named by `base_model_prefix`) or, when that is the
  model itself, `model.get_decoder()`; called with `input_ids`, `attention_mask`, `use_cache`, it
  returns the hidden states the lm_head reads (`last_hidden_state`, or the first output);
- the lm_head: `model.get_output_embeddings()`, a module with a `[V, H]` weight (and optional bias);
- the logit transforms and vocabulary padding its config declares (`head_transforms.py`).
`check_output_head` then compares log-probs and gradients with the model's own logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .head_transforms import HEAD_TRANSFORMS, UNPADDED_VOCAB_FIELDS, head_transforms, unpadded_vocab_size

# relative tolerance of the head check, by the lm_head's dtype: fp32 rounding over a GEMM and a
# log-softmax is ~1e-6 of the largest value; 16-bit GEMMs round to ~1e-2 (bf16) or ~1e-3 (fp16)
HEAD_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
CHECK_POSITIONS = 64  # tokens of each probe row the head check scores


def head_check_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """`HEAD_CHECK_TOLERANCE[dtype]`; fp32 GEMMs on CUDA with TF32 allowed round like fp16."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return HEAD_CHECK_TOLERANCE[torch.float16]
    return HEAD_CHECK_TOLERANCE.get(dtype, HEAD_CHECK_TOLERANCE[torch.bfloat16])


@dataclass(frozen=True)
class OutputHead:
    """logits = softcap(logit_scale * (hidden @ weight.T + bias)). `parameter` (and
    `bias_parameter`) are the model's own lm_head parameters (tied to the input embedding when the
    model ties them), never copies; `weight` and `bias` are their first `rows` rows (a view) when
    the model scores only part of a padded vocabulary."""

    parameter: torch.Tensor
    bias_parameter: Optional[torch.Tensor]
    logit_scale: float
    softcap: Optional[float]
    rows: Optional[int] = None
    transforms: tuple = ()  # (config field, op, value) read from the config, for messages

    @property
    def weight(self) -> torch.Tensor:
        return self.parameter if self.rows is None else self.parameter[:self.rows]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        if self.bias_parameter is None or self.rows is None:
            return self.bias_parameter
        return self.bias_parameter[:self.rows]


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_head(model) -> OutputHead:
    """The lm_head of `model`, with the transforms and the vocabulary rows its config declares
    (`head_transforms.HEAD_TRANSFORMS`). `check_output_head` verifies it against the model's own logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model {type(model).__name__}: get_output_embeddings() returned no module with a [V, H] "
                         "weight; the trainer needs the lm_head (a linear layer over the vocabulary) from it")
    bias = getattr(head, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    scale, softcap, applied = head_transforms(model.config, text_config(model))
    rows = unpadded_vocab_size(model.config, text_config(model))
    if rows is not None and not 0 < rows <= weight.shape[0]:
        raise ValueError(f"model {type(model).__name__}: config field {UNPADDED_VOCAB_FIELDS[0]}={rows} is not in "
                         f"(0, {weight.shape[0]}], the lm_head's rows")
    return OutputHead(parameter=weight, bias_parameter=bias, logit_scale=scale, softcap=softcap,
                      rows=None if rows == weight.shape[0] else rows, transforms=tuple(applied))


def backbone(model) -> torch.nn.Module:
    """The module that turns token ids into the hidden states the lm_head reads: `base_model`,
    else `get_decoder()`, else the `model` attribute (transformers' name for it in `...ForCausalLM`)."""
    candidates = (getattr(model, "base_model", None),
                  model.get_decoder() if hasattr(model, "get_decoder") else None,
                  getattr(model, "model", None))
    for candidate in candidates:
        if isinstance(candidate, torch.nn.Module) and candidate is not model:
            return candidate
    raise ValueError(f"model {type(model).__name__} exposes no backbone: base_model and get_decoder() return the "
                     "model itself and it has no `model` submodule; the trainer needs the module that computes the "
                     "hidden states before the lm_head (set base_model_prefix to its attribute name, or override "
                     "get_decoder())")


def _hidden_of(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def last_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[rows, T, H]` hidden states after the backbone's final norm: what the lm_head would read.
    The backbone runs alone; the model's own lm_head (and its `[rows, T, V]` logits) never runs."""
    return _hidden_of(backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))


@contextlib.contextmanager
def _outputs_of(*modules):
    """Collects the outputs of `modules` in the forwards run inside the block: a dict module -> list."""
    captured = {module: [] for module in modules if module is not None}
    handles = [module.register_forward_hook(lambda module, args, output: captured[module].append(output))
               for module in captured]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def hidden_states_from_root(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **forward_kwargs):
    """(`[rows, T, H]` backbone output, the model's own output) from the model's full forward with
    no position kept for the logits (`logits_to_keep` empty: the lm_head projects `[rows, 0, H]`),
    for what only the full forward gives: FSDP2's hooks, the MoE router aux loss."""
    outer = backbone(model)
    inner = outer.get_decoder() if hasattr(outer, "get_decoder") else None  # what OPT's forward calls directly
    with _outputs_of(outer, inner) as captured:
        no_positions = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=no_positions,
                    **forward_kwargs)
    outputs = captured[outer] or captured.get(inner)
    if not outputs:
        raise ValueError(f"model {type(model).__name__}: its forward does not call its backbone "
                         f"({type(outer).__name__}) or that backbone's decoder; the trainer cannot take the hidden "
                         "states from it")
    if out.logits is not None and out.logits.numel() != 0:
        raise ValueError(f"model {type(model).__name__} ignores logits_to_keep: its full forward builds the "
                         "[rows, T, V] logits, which the trainer never does (FSDP2 and the MoE router aux loss "
                         "need a model whose forward can skip them)")
    return _hidden_of(outputs[-1]), out


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = theirs.abs().max().item()
    return (ours.double() - theirs.double()).abs().max().item() / max(scale, 1e-30)


def _embedded(model, captured) -> list:
    """The input embeddings' output of a forward (a tensor the log-probs depend on), when seen."""
    outputs = captured.get(model.get_input_embeddings(), [])
    last = outputs[-1] if outputs else None
    return [last] if isinstance(last, torch.Tensor) and last.requires_grad else []


def _own_token_logps(model, head: OutputHead, input_ids, attention_mask, labels):
    """(`[rows, T-1]` token log-probs from the model's own logits, the tensors to differentiate)."""
    with _outputs_of(model.get_input_embeddings()) as captured:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if logits.shape[-1] != head.weight.shape[0]:
        raise ValueError(
            f"model {type(model).__name__}: its logits have {logits.shape[-1]} vocabulary columns, but the trainer "
            f"scores {head.weight.shape[0]} lm_head rows ({UNPADDED_VOCAB_FIELDS[0]}="
            f"{head.rows if head.rows is not None else 'unset'}); the model pads or slices its vocabulary in a way the "
            f"trainer does not know, so it is refused (known config fields: {', '.join(UNPADDED_VOCAB_FIELDS)})")
    logps = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    token_logps = logps.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels[:, 1:] != -100)
    return token_logps, _embedded(model, captured)


def _our_token_logps(model, head: OutputHead, input_ids, attention_mask, labels):
    """The same through the trainer's path: backbone, then the linear path over `head`."""
    from ..linear.linear_sequence_logps import linear_sequence_logps

    with _outputs_of(model.get_input_embeddings()) as captured:
        hidden = last_hidden_states(model, input_ids, attention_mask)
    if hidden.shape[-1] != head.weight.shape[1]:
        raise ValueError(
            f"model {type(model).__name__}: its lm_head reads {head.weight.shape[1]}-wide inputs but its backbone "
            f"returns {hidden.shape[-1]}-wide hidden states: the model transforms them between backbone and lm_head "
            "(a projection the trainer does not know), so it cannot be trained through the linear path")
    out = linear_sequence_logps(hidden, head.weight, labels, head.bias, shift=True, return_token_logps=True,
                                logit_scale=head.logit_scale, softcap=head.softcap)
    return out.token_logps[:, :-1], _embedded(model, captured)


def check_output_head(model, head: OutputHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Score the tokens of a real batch (its first `CHECK_POSITIONS` positions) through `head` on
    the backbone's hidden states, and through the model's own logits; compare the log-probs and
    their gradients w.r.t. the input embeddings' output and the lm_head parameters, with a relative
    tolerance set by the lm_head's dtype (`head_check_tolerance`). A model whose head applies a
    transform the trainer does not know is refused instead of trained on the wrong log-probs. The
    probe's `[rows, T, V]` logits are built here, once, in eval mode."""
    input_ids, attention_mask = input_ids[:, :CHECK_POSITIONS], attention_mask[:, :CHECK_POSITIONS]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    params = {name: p for name, p in (("lm_head weight", head.parameter), ("lm_head bias", head.bias_parameter))
              if p is not None and p.requires_grad}
    tolerance = head_check_tolerance(head.parameter.dtype, head.parameter.device)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            own, own_embedded = _own_token_logps(model, head, input_ids, attention_mask, labels)
            ours, our_embedded = _our_token_logps(model, head, input_ids, attention_mask, labels)
            errors = {"log-probs": _relative_error(ours, own)}
            names = (["input embeddings"] if own_embedded and our_embedded else []) + list(params)
            if names:
                embedded = (own_embedded, our_embedded) if own_embedded and our_embedded else ([], [])
                own_grads = torch.autograd.grad(own.sum(), embedded[0] + list(params.values()), allow_unused=True)
                our_grads = torch.autograd.grad(ours.sum(), embedded[1] + list(params.values()), allow_unused=True)
                for name, a, b in zip(names, our_grads, own_grads):
                    zero = torch.zeros(())
                    errors[f"gradient w.r.t. the {name}"] = _relative_error(zero if a is None else a,
                                                                           zero if b is None else b)
    finally:
        model.train(was_training)
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        declared = ", ".join(f"{f} ({op} {v:g})" for f, op, v in head.transforms) or "none"
        known = ", ".join(sorted({row.field for row in HEAD_TRANSFORMS}))
        found = "; ".join(f"{k} {v:.3g}" for k, v in bad.items())
        raise ValueError(
            f"model {type(model).__name__}: log-probs through its lm_head (logit_scale={head.logit_scale:g}, "
            f"softcap={head.softcap}; config transforms read: {declared}) differ from its own logits' (relative "
            f"error: {found}; {head.parameter.dtype} tolerance {tolerance:g}); its output head applies a transform "
            f"the trainer does not know, so it cannot be trained through the linear path (known config fields: "
            f"{known})")
