"""benchmarks/gpu_session_results.py: the two calls' unpacked bundles become one results JSON that
benchmarks/report.py reads, and a session summary in markdown; nothing is overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.report import load_rows

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "cpu-2026-11-21.json"  # a real run of the suite
END_TO_END = {
    "settings": {"dtype": "bfloat16", "pairs": 2, "hidden": 2048, "layers": 16, "vocab": 128256},
    "environment": {"versions": {"trl": "1.16.0"}, "gpu_name": "NVIDIA H200"},
    "parameters": 1_235_814_400,
    "trainers": {
        "dpo_kernels": {"at_seq_len": {"seq_len": 4096, "median_step_s": 0.5, "tokens_per_s": 32768.0,
                                       "peak_memory_gib": 30.25, "error": None},
                        "longest_seq_len": {"longest_fitting": 40960, "shortest_failing": 41216}},
        "trl": {"at_seq_len": {"seq_len": 4096, "error": "out of memory: OutOfMemoryError: ..."}},
    },
}


def _script(*args):
    return subprocess.run([sys.executable, "benchmarks/gpu_session_results.py", *map(str, args)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)


def test_merges_both_calls_for_report_py(tmp_path):
    run_a, run_b, out = tmp_path / "a", tmp_path / "b", tmp_path / "results"
    run_a.mkdir()
    run_b.mkdir()
    shutil.copy(RESULTS, run_a / "gpu-2026-12-03-centre-logits_path.json")
    shutil.copy(RESULTS, run_b / "gpu-2026-12-03-rest-logits_path.json")
    (run_a / "ceilings.json").write_text(json.dumps(dict(copy_bandwidth_gbs=4300.0, copy_bytes=1 << 30,
                                                         bf16_matmul_tflops=780.0, matmul_size=8192)))
    (run_a / "summary.txt").write_text("gpu_run.sh a: budget 350s\ninstall 80s 41 ok\n")
    (run_b / "end-to-end-dpo-step.json").write_text(json.dumps(END_TO_END))
    result = _script(run_a, run_b, "--name", "h200-2026-12-03", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    merged = json.loads((out / "h200-2026-12-03.json").read_text())
    rows = len(json.loads(RESULTS.read_text())["benchmarks"])
    assert len(merged["benchmarks"]) == 2 * rows
    assert merged["sources"] == ["a/gpu-2026-12-03-centre-logits_path.json", "b/gpu-2026-12-03-rest-logits_path.json"]
    assert merged["ceilings"]["bf16_matmul_tflops"] == 780.0 and merged["end_to_end"] == END_TO_END
    assert set(merged["steps"]) == {"a"}
    session = (out / "h200-2026-12-03-session.md").read_text()
    assert "copy 4300 GB/s" in session and "bf16 matmul 780 TFLOP/s" in session
    assert "| dpo_kernels | 4096 | 0.500 | 32768.0 | 30.2 | 40960 (fails at 41216) |" in session
    assert "| trl | 4096 | failed: out of memory" in session
    assert "install 80s 41 ok" in session

    machine, table_rows = load_rows([out / "h200-2026-12-03.json"])  # what report.py tabulates and plots
    assert machine == json.loads(RESULTS.read_text())["machine_info"]
    assert len(table_rows) == 2 * len(load_rows([RESULTS])[1]) > 0

    again = _script(run_a, run_b, "--name", "h200-2026-12-03", "--out-dir", out)
    assert again.returncode == 2 and "never overwritten" in again.stderr


def test_refuses_folders_without_results(tmp_path):
    result = _script(tmp_path, "--name", "x", "--out-dir", tmp_path / "results")
    assert result.returncode == 2 and "no results in" in result.stderr
    assert not (tmp_path / "results").exists()
