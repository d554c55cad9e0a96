"""Training checkpoints: written atomically, verified by checksums, loaded without unpickling arbitrary objects.

A checkpoint is a directory `<output_dir>/checkpoints/step-00000123/` holding
- `model.safetensors`: the policy's full state dict (safetensors; tied weights stored once, their
  other names kept as aliases in the file's metadata),
- `optimizer.pt`, `scheduler.pt`, `rng.pt` (the random generators of every rank): state dicts of
  tensors and plain Python values, read back with `torch.load(weights_only=True)`,
- `trainer_state.json`: the step, the settings, the fingerprints of the data and the reference, the
  run's id and the session (one per start or resume) that wrote it,
- `manifest.json`, written last: the size and sha256 of every other file.
It is written into a temporary sibling directory and renamed into place, so a crash leaves either
the previous checkpoint or the new one, never a half-written one. Before a checkpoint is used its
files are checked against the manifest; a missing, truncated or altered file is a `CheckpointError`
naming the file, and resuming without a path falls back to the newest checkpoint that is intact.
Checkpoints are ordered by (session, step): the newest is the one written last, also when a run was
resumed from an older checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .fingerprint import file_sha256

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line that names the file at fault."""


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


def _write_manifest(directory: Path) -> None:
    """`manifest.json` with the size and sha256 of every file in `directory`, written atomically."""
    files = {item.name: {"bytes": item.stat().st_size, "sha256": file_sha256(item)}
             for item in sorted(directory.iterdir()) if item.is_file()}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST_FILE)


def save_checkpoint(checkpoints_dir: Path, step: int, *, model_state: dict, optimizer_state: dict,
                    scheduler_state: dict, rng_states: list, trainer_state: dict, keep: int) -> Path:
    """Write the checkpoint of `step` atomically, from one process (rank 0 under data
    parallelism): the full model and optimizer state dicts, every rank's `rng_state()`, then the
    manifest. Keeps the newest `keep` checkpoints of the run `trainer_state["run_id"]`; checkpoints
    of other runs, and ones whose state cannot be read, are never removed."""
    from safetensors.torch import save_file

    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step:08d}"
    tmp = checkpoints_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors, aliases = _unique_tensors(model_state)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save({"ranks": list(rng_states)}, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
        for item in tmp.iterdir():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        _write_manifest(tmp)
        _fsync_dir(tmp)
    except BaseException:  # an error, or a second Ctrl-C: no debris, the previous checkpoints as they were
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a rerun from an earlier checkpoint reaches this step again
        stale = checkpoints_dir / f".stale-step-{step:08d}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    _fsync_dir(checkpoints_dir)
    run_id = trainer_state.get("run_id")
    ours = [p for p in list_checkpoints(checkpoints_dir) if (peek_state(p) or {}).get("run_id") == run_id]
    for old in ours[:-keep]:
        shutil.rmtree(old)
    return final


def peek_state(path: Path) -> Optional[dict]:
    """The `trainer_state.json` of checkpoint `path`, or None when it is missing or unreadable."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _order(path: Path) -> tuple:
    """(session, step): a checkpoint whose state cannot be read sorts as the newest, so that resuming
    names it when it skips it."""
    step = int(CHECKPOINT_PATTERN.match(path.name).group(1))
    session = (peek_state(path) or {}).get("session", math.inf)
    return (session if isinstance(session, int) else math.inf, step)


def list_checkpoints(checkpoints_dir: Path) -> list:
    """Checkpoint directories (`step-NNNNNNNN`) under `checkpoints_dir`, intact or not, oldest first
    by (session, step)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
    return sorted(found, key=_order)


def latest_session(checkpoints_dir: Path) -> int:
    """The highest session number recorded under `checkpoints_dir` (-1 when there is none)."""
    sessions = [(peek_state(p) or {}).get("session") for p in list_checkpoints(checkpoints_dir)]
    return max([s for s in sessions if isinstance(s, int)], default=-1)


def verify_checkpoint(path: Path) -> None:
    """Check every file of checkpoint `path` against its manifest: present, of the recorded size, of
    the recorded sha256. Raises `CheckpointError` naming the first file at fault."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (the checkpoint is incomplete, or from a version without "
                              "checksums)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable ({type(exc).__name__})") from None
    for name in CHECKPOINT_FILES:
        if name not in files:
            raise CheckpointError(f"{path / name}: not listed in {MANIFEST_FILE}")
    for name, size, digest in entries:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file}: {actual} bytes where {MANIFEST_FILE} records {size} (truncated or "
                                  "altered)")
        if file_sha256(file) != digest:
            raise CheckpointError(f"{file}: its sha256 differs from the one in {MANIFEST_FILE} (altered)")


def newest_intact_checkpoint(checkpoints_dir: Path) -> tuple:
    """(the newest checkpoint under `checkpoints_dir` that verifies, [one line per newer checkpoint
    skipped, saying why]). FileNotFoundError when there is no checkpoint at all, `CheckpointError`
    when none is intact."""
    candidates = list_checkpoints(checkpoints_dir)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {checkpoints_dir}: nothing to resume")
    skipped = []
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        return path, skipped
    raise CheckpointError(f"no intact checkpoint in {checkpoints_dir}: " + "; ".join(skipped))


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, read back: full state dicts and this rank's RNG state."""

    model_state: dict
    optimizer_state: dict
    scheduler_state: dict
    rng_state: dict
    trainer_state: dict


def _read(path: Path, reader):
    """`reader(path)`, with any failure turned into a one-line `CheckpointError` naming the file."""
    try:
        return reader(path)
    except Exception as exc:  # noqa: BLE001 - a file that passed its checksum yet does not load
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {first_line})") from None


def read_checkpoint(path: Path, *, rank: int = 0, device="cpu", verify: bool = True) -> Checkpoint:
    """Read `path` for process `rank`, after checking its files against the manifest (unless
    `verify=False`: the caller has just done so). Only safetensors and
    `torch.load(weights_only=True)`: nothing in the directory can run code."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if verify:
        verify_checkpoint(path)

    def load_model(file):
        state = load_file(str(file), device=str(device))
        with safe_open(str(file), framework="pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        for name, stored in aliases.items():
            state[name] = state[stored]
        return state

    model_state = _read(path / "model.safetensors", load_model)
    rng = _read(path / "rng.pt", lambda file: torch.load(file, weights_only=True)["ranks"])
    if rank >= len(rng):
        raise ValueError(f"checkpoint {path} was written by {len(rng)} process(es); this is rank {rank}: resume "
                         f"with the same number of processes")
    return Checkpoint(
        model_state=model_state,
        optimizer_state=_read(path / "optimizer.pt",
                              lambda file: torch.load(file, map_location=device, weights_only=True)),
        scheduler_state=_read(path / "scheduler.pt", lambda file: torch.load(file, weights_only=True)),
        rng_state=rng[rank],
        trainer_state=_read(path / STATE_FILE, lambda file: json.loads(file.read_text())),
    )
