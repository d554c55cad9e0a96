"""benchmarks/cuda_sanitizer_driver.py, the program the GPU session runs under compute-sanitizer: on CPU
with the C++ backend (the same calls, the same contract), so that it cannot rot between GPU sessions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_driver_launches_every_kernel_variant_on_cpu():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "benchmarks/cuda_sanitizer_driver.py", "--backend", "cpu", "--device",
                             "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok"
    # per dtype: 2 logits-path calls, 3 transforms x (2 folds + 2 gradients)
    assert len(lines) == 1 + 3 * (2 + 3 * 4)
    for dtype in ("float32", "bfloat16", "float16"):
        assert f"sequence_logps torch.{dtype} in place" in lines
        assert f"fold_tile torch.{dtype} softcap with extras" in lines
        assert f"tile_logits_grad_ torch.{dtype} scale with entropy" in lines
