"""Training checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a directory `<output_dir>/checkpoints/step-00000123/` holding
- `model.safetensors`: the policy's parameters and buffers (safetensors; tied weights stored once),
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


def save_checkpoint(checkpoints_dir: Path, step: int, *, model, optimizer, scheduler, trainer_state: dict,
                    keep: int, rng_states: list) -> Path:
    """Write the checkpoint of `step` atomically (from one process: rank 0 under data parallelism);
    `rng_states` holds `rng_state()` of every rank. Keeps the newest `keep` checkpoints."""
    from safetensors.torch import save_model

    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step:08d}"
    tmp = checkpoints_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
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


def load_checkpoint(path: Path, *, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; return its trainer
    state. Only safetensors and `weights_only` loads: nothing in the directory can run code."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete or not a checkpoint (no {STATE_FILE})")
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
    if unexpected or missing:
        raise ValueError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = json.loads((path / STATE_FILE).read_text())
    rng = torch.load(path / "rng.pt", weights_only=True)["ranks"]
    if rank >= len(rng):
        raise ValueError(f"checkpoint {path} was written by {len(rng)} rank(s); this is rank {rank}: resume with "
                         f"the same number of processes")
    set_rng_state(rng[rank])
    return state
