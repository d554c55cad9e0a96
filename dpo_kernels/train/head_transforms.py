"""The transforms a model's config declares for its output logits, read from one table, as the
linear path takes them: `logits = softcap(logit_scale * (hidden @ weight.T + bias))`.

A transform not in this table is not guessed: `check_output_head` compares the result with the
model's own log-probs and refuses a model whose head does something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class HeadTransform:
    """`field` of the (text) config; `op`: "multiply" or "divide" the logits by it, or "softcap"
    them (`cap * tanh(z / cap)`, after the scaling); `model_types`: the configs it applies to
    (empty: any config that has the field)."""

    field: str
    op: str
    model_types: Tuple[str, ...] = ()
    families: str = ""


# first matching row wins: a field whose meaning depends on the model type lists the exceptions first
HEAD_TRANSFORMS = (
    HeadTransform("logit_scale", "multiply", families="Cohere, Cohere2, Cohere2-MoE, Command-A"),
    HeadTransform("logits_scaling", "multiply", ("hyperclovax", "hyperclovax_vision_v2"), "HyperCLOVA X"),
    HeadTransform("logits_scaling", "divide", families="Granite, GraniteMoE, GraniteMoE-Shared/Hybrid, Granite-SWA"),
    HeadTransform("lm_head_multiplier", "multiply", families="Falcon-H1"),
    HeadTransform("logits_mup_width_multiplier", "divide", families="Inkling (hidden states divided; no lm_head bias)"),
    HeadTransform("output_multiplier", "multiply", ("muse_glimmer", "muse_spark", "muse_glimmer_text",
                                                    "muse_spark_text"), "MuseGlimmer, MuseSpark"),
    HeadTransform("final_logit_softcapping", "softcap", families="Gemma 2/3/4, PaliGemma, VaultGemma, nanochat"),
    HeadTransform("logits_soft_cap", "softcap", families="RecurrentGemma"),
    HeadTransform("output_logit_soft_cap", "softcap", families="xLSTM"),
)

# config fields naming the rows of the lm_head that the model scores (the rest is padding)
UNPADDED_VOCAB_FIELDS = ("unpadded_vocab_size",)


def _types(*configs) -> set:
    return {getattr(c, "model_type", None) for c in configs}


def _lookup(field: str, configs) -> Optional[float]:
    for config in configs:
        value = getattr(config, field, None)
        if value is not None and not isinstance(value, bool):
            return float(value)
    return None


def head_transforms(config, text_config) -> Tuple[float, Optional[float], list]:
    """(logit_scale, softcap, applied) of a model from its configs (the text config first);
    `applied` lists `(field, op, value)` for messages. ValueError for two different soft caps."""
    configs = (text_config, config)
    types = _types(*configs)
    scale, softcap, applied, seen = 1.0, None, [], set()
    for row in HEAD_TRANSFORMS:
        if row.field in seen or (row.model_types and not types & set(row.model_types)):
            continue
        value = _lookup(row.field, configs)
        if value is None:
            continue
        seen.add(row.field)
        if value <= 0:
            raise ValueError(f"config field {row.field}={value}: a logit {row.op} factor must be > 0")
        if row.op == "multiply":
            scale *= value
        elif row.op == "divide":
            scale /= value
        elif softcap is not None and softcap != value:
            raise ValueError(f"config declares two logit soft caps ({softcap} and {row.field}={value}); "
                             "the linear path applies one")
        else:
            softcap = value
        applied.append((row.field, row.op, value))
    return scale, softcap, applied


def unpadded_vocab_size(config, text_config) -> Optional[int]:
    """The number of lm_head rows the model scores when its config says it slices its logits."""
    for field in UNPADDED_VOCAB_FIELDS:
        value = _lookup(field, (text_config, config))
        if value is not None:
            return int(value)
    return None
