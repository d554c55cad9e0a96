"""Tiny random configs of transformers causal-LM architectures (1-2 layers, hidden 32, vocab 128)
for the model-zoo tests: the common sizes are applied to every field a config has, then each
architecture's own overrides (head transforms, biases, tying, padded vocabularies)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

VOCAB = 128
TINY_SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
    d_model=32, num_layers=2, num_heads=4, ffn_dim=64, n_inner=64, moe_intermediate_size=32, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
    pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(model_type: str, **overrides):
    """`AutoConfig.for_model(model_type)` with `TINY_SIZES` (where the config has the field) and
    `overrides`. pytest.skip when this transformers does not know `model_type`."""
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r} architecture")
    default = transformers.AutoConfig.for_model(model_type)
    sizes = {k: v for k, v in TINY_SIZES.items() if k in default.to_dict()}
    return transformers.AutoConfig.for_model(model_type, **{**sizes, **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A fp32 `AutoModelForCausalLM` with random weights (seeded) from `tiny_config`."""
    import torch

    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config).float()
