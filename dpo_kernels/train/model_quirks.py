"""What a Hugging Face model does differently in training mode, turned off so that the policy (in
training mode) and the frozen reference (in eval mode) compute the same function at step 0.

- Dropout, three ways: `nn.Dropout` modules (p = 0); float rates that modules keep as attributes
  and pass to functional dropout (OPT, BioGPT, XGLM, GPTBigCode, Seed-OSS: `self.dropout`,
  `self.attention_dropout`, `resid_pdrop`, ...); the same fields in the model's config and its
  sub-configs, for modules that read the config at each forward. LayerDrop and drop-path rates
  count as dropout.
- Routing noise: multiplicative jitter on router inputs in training (Mixtral, MiniMax: `jitter_noise`;
  PhiMoE: `input_jitter_noise`; DBRX: `moe_jitter_eps`) is set to 0.
- Sampled routing: routers that draw their experts at random in training mode (PhiMoE's
  sparsemixer, Gumbel sampling) are kept in eval mode, where they take the top experts.

Nothing is copied; the model is changed in place (and `save_pretrained` then records the zero
rates in its config).
"""

from __future__ import annotations

import re

import torch

# float attributes of modules and configs that hold a dropout-like rate
_DROPOUT_NAME = re.compile(r"(dropout|pdrop|drop_prob|drop_rate|drop_path|layerdrop|layer_drop)")
# float attributes holding training-only random noise on router inputs (not PhiMoE's `router_jitter_noise`,
# which is the sparsemixer's deterministic threshold in both modes)
_ROUTING_NOISE = frozenset({"jitter_noise", "input_jitter_noise", "moe_jitter_eps"})
# router classes that sample their experts in training mode: pinned to eval mode
SAMPLING_ROUTERS = frozenset({"PhimoeTopKRouter"})


def _zero_rates(obj, names) -> list:
    changed = []
    for name, value in list(vars(obj).items()):
        if isinstance(value, float) and value != 0.0 and names(name):
            setattr(obj, name, 0.0)
            changed.append(name)
    return changed


def _is_rate(name: str) -> bool:
    return bool(_DROPOUT_NAME.search(name)) or name in _ROUTING_NOISE


def _configs(config, seen=None):
    """`config` and every sub-config it holds (text, vision, audio, ...)."""
    seen = set() if seen is None else seen
    if config is None or id(config) in seen:
        return
    seen.add(id(config))
    yield config
    for value in list(vars(config).values()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            yield from _configs(value, seen)


def _stay_in_eval_mode(module, args):
    module.training = False


def disable_training_randomness(model: torch.nn.Module) -> None:
    """Dropout off (modules, module attributes, config fields), router noise off, sampling routers
    pinned to eval mode; see the module docstring."""
    for config in _configs(getattr(model, "config", None)):
        _zero_rates(config, _is_rate)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        _zero_rates(module, _is_rate)
        if type(module).__name__ in SAMPLING_ROUTERS and not getattr(module, "_dk_eval_pinned", False):
            module.register_forward_pre_hook(_stay_in_eval_mode)
            module._dk_eval_pinned = True
