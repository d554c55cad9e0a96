"""The run's metrics as JSON lines (`<output_dir>/metrics.jsonl`), one object per logged event:
`{"step": 12, "split": "train", "loss": ..., "rewards/accuracies": ..., ...}`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """Append-only JSONL log. On resume, events after the checkpoint's step are dropped first, so
    a resumed run's log reads as if it had never stopped."""

    def __init__(self, path: Path, *, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, step: int, split: str, metrics: dict) -> None:
        record = {"step": step, "split": split}
        record.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()})
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(path: Path) -> list:
    """The events of a metrics log, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
