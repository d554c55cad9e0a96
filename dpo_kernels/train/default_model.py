"""The embedded default's model: a small Llama-architecture causal LM built from a config with
random weights (seeded), sized so that the default dataset trains on a CPU in well under 2 minutes."""

from __future__ import annotations

import torch

DEFAULT_MODEL_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def default_model(tokenizer, *, seed: int = 0, **overrides):
    """`LlamaForCausalLM` over `tokenizer`'s vocabulary (input and output embeddings tied unless
    overridden); the same seed gives the same weights. `overrides` replace entries of
    `DEFAULT_MODEL_SIZES`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {**DEFAULT_MODEL_SIZES, **overrides}
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
