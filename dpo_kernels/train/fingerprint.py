"""Content hashes that key cached reference log-probs and check that a resumed run uses the same
reference: a model's parameters and buffers, and the tokenised pairs; and the sha256 of a file
(checkpoint manifests, the data files recorded in `run.json`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

_BLOCK = 1 << 24  # bytes hashed per host copy: large models are hashed a block at a time


def _update_with_tensor(hasher, name: str, tensor: torch.Tensor) -> None:
    hasher.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return
    per_block = max(1, _BLOCK // flat.element_size())
    for start in range(0, flat.numel(), per_block):
        block = flat[start:start + per_block].cpu().contiguous()
        hasher.update(block.view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hex digest of the model's class, config and every parameter and buffer (names, shapes,
    dtypes, bytes). Tied weights are hashed once per name, which is deterministic."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        hasher.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict(keep_vars=False).items():
        _update_with_tensor(hasher, name, tensor)
    return hasher.hexdigest()


def pairs_fingerprint(pairs, **settings) -> str:
    """Hex digest of tokenised pairs (their ids, in order) and of `settings` (JSON-serialisable)."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for pair in pairs:
        hasher.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return hasher.hexdigest()


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file at `path`, read a block at a time."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            hasher.update(block)
    return hasher.hexdigest()
