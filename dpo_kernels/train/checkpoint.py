"""Training checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a directory `<output_dir>/checkpoints/step-00000123/` holding
- `model.safetensors`: the policy's full state dict (safetensors; tied weights stored once, their
  other names kept as aliases in the file's metadata),
- `optimizer.pt`, `scheduler.pt`, `rng.pt` (the random generators of every rank): state dicts of
  tensors and plain Python values, read back with `torch.load(weights_only=True)`,
- `trainer_state.json`: the step, the settings and the fingerprints of the data and the reference.
It is written into a temporary sibling directory and renamed into place, so a crash leaves either
the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    """Every random generator the run draws from, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_tensors(state: dict):
    """(tensors, aliases): tensors that share storage (tied weights) are stored once, and the
    other names recorded as aliases of the stored one."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous()
    return unique, aliases


def save_checkpoint(checkpoints_dir: Path, step: int, *, model_state: dict, optimizer_state: dict,
                    scheduler_state: dict, rng_states: list, trainer_state: dict, keep: int) -> Path:
    """Write the checkpoint of `step` atomically, from one process (rank 0 under data
    parallelism): the full model and optimizer state dicts, every rank's `rng_state()`. Keeps the
    newest `keep` checkpoints."""
    from safetensors.torch import save_file

    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step:08d}"
    tmp = checkpoints_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, aliases = _unique_tensors(model_state)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    torch.save({"ranks": list(rng_states)}, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    for item in tmp.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a rerun from an earlier checkpoint reaches this step again
        stale = checkpoints_dir / f".stale-step-{step:08d}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    _fsync_dir(checkpoints_dir)
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list:
    """Complete checkpoints under `checkpoints_dir`, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir()
             if CHECKPOINT_PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, read back: full state dicts and this rank's RNG state."""

    model_state: dict
    optimizer_state: dict
    scheduler_state: dict
    rng_state: dict
    trainer_state: dict


def read_checkpoint(path: Path, *, rank: int = 0, device="cpu") -> Checkpoint:
    """Read `path` for process `rank`. Only safetensors and `torch.load(weights_only=True)`:
    nothing in the directory can run code."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete or not a checkpoint (no {STATE_FILE})")
    model_state = load_file(str(path / "model.safetensors"), device=str(device))
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    for name, stored in aliases.items():
        model_state[name] = model_state[stored]
    rng = torch.load(path / "rng.pt", weights_only=True)["ranks"]
    if rank >= len(rng):
        raise ValueError(f"checkpoint {path} was written by {len(rng)} process(es); this is rank {rank}: resume "
                         f"with the same number of processes")
    return Checkpoint(
        model_state=model_state,
        optimizer_state=torch.load(path / "optimizer.pt", map_location=device, weights_only=True),
        scheduler_state=torch.load(path / "scheduler.pt", weights_only=True),
        rng_state=rng[rank],
        trainer_state=json.loads((path / STATE_FILE).read_text()),
    )
