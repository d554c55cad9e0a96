"""Shared pieces of the trainer tests: a tiny model over the default tokenizer and a slice of the
shipped preference data, tokenised."""

from __future__ import annotations

import functools

import pytest

transformers = pytest.importorskip("transformers")

from dpo_kernels.train.data import load_preference_records, tokenize_pairs  # noqa: E402
from dpo_kernels.train.default_dataset import default_dataset_path  # noqa: E402
from dpo_kernels.train.default_model import default_model  # noqa: E402
from dpo_kernels.train.default_tokenizer import default_tokenizer  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@functools.lru_cache(maxsize=None)
def tokenizer():
    return default_tokenizer()


def tiny_model(seed: int = 0, **overrides):
    return default_model(tokenizer(), seed=seed, **{**TINY, **overrides})


@functools.lru_cache(maxsize=None)
def _records(split: str):
    return tuple(load_preference_records(default_dataset_path(split)))


def pairs(split: str = "train", count: int = 32):
    """The first `count` shipped pairs of `split`, tokenised by the default tokenizer."""
    tokenised, _ = tokenize_pairs(list(_records(split)[:count]), tokenizer())
    return tokenised
