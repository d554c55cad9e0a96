"""A run directory (`--output-dir`) belongs to one run.

What a run writes there: `run.json` (the command line's record of the run: its resolved settings, the
checksums of its data files, and what each resume changed), `metrics.jsonl`, `checkpoints/`,
`ref_logps/` (the default cache of reference log-probs), `model/` and `plots/`. A new run is refused
in a directory that holds any of them; `--overwrite` removes exactly these (other files are left
alone) before the new run writes anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List

RUN_FILE = "run.json"
RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "ref_logps", "model", "plots")


def run_files(directory: Path, *, include_record: bool = True) -> List[str]:
    """The names of the run outputs present in `directory` (empty folders do not count)."""
    directory = Path(directory)
    names = ((RUN_FILE,) if include_record else ()) + RUN_OUTPUTS
    present = []
    for name in names:
        path = directory / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            present.append(name + ("/" if path.is_dir() else ""))
    return present


def refuse_another_run(directory: Path, *, include_record: bool = True) -> None:
    """ValueError when `directory` already holds a run's outputs, saying how to continue or replace it."""
    present = run_files(directory, include_record=include_record)
    if present:
        raise ValueError(
            f"--output-dir {directory} already holds a run ({', '.join(present)}); nothing was changed. "
            "Continue it with --resume, replace it with --overwrite (which deletes those files first), "
            "or choose another --output-dir")


def remove_run(directory: Path) -> List[str]:
    """Delete the run outputs in `directory` (and nothing else); returns what was removed."""
    removed = run_files(directory)
    for name in removed:
        path = Path(directory) / name.rstrip("/")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def write_run_record(directory: Path, record: dict) -> None:
    """Write `run.json` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / RUN_FILE)


def read_run_record(directory: Path) -> dict:
    """`run.json` of `directory`; FileNotFoundError/ValueError naming the directory or the file."""
    directory = Path(directory)
    path = directory / RUN_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"--output-dir {directory}: no such directory: there is no run to resume")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing, so {directory} holds no run started by `dpo-kernels train` to "
                                "resume")
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise ValueError("no settings")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}): the run's settings cannot be restored") \
            from None
    return record

