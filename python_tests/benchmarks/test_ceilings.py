"""benchmarks/ceilings.py (copy bandwidth and bf16 matmul rate) at small sizes on CPU: the JSON the GPU
session records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ceilings_writes_both_rates(tmp_path):
    out = tmp_path / "ceilings.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "benchmarks/ceilings.py", "--device", "cpu", "--copy-bytes", "1048576",
                             "--matmul-size", "64", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ceilings = json.loads(out.read_text())
    assert ceilings["device"] == "cpu" and ceilings["copy_bytes"] == 1048576 and ceilings["matmul_size"] == 64
    assert ceilings["copy_bandwidth_gbs"] > 0 and ceilings["bf16_matmul_tflops"] > 0
