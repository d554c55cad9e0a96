"""benchmarks/end_to_end_dpo_step.py: the search for the longest sequence that fits, and the CLI at a
tiny Llama config on CPU through both trainers (what the GPU session runs at the 1B shape)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.end_to_end_dpo_step import longest_fitting

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "end_to_end_dpo_step.py"
TINY = ["--device", "cpu", "--hidden", "32", "--layers", "2", "--intermediate", "64", "--heads", "4", "--kv-heads",
        "2", "--vocab", "512", "--pairs", "1", "--seq-len", "24", "--warmup", "1", "--steps", "2", "--max-seq-len",
        "48", "--granularity", "8", "--time-limit", "300"]


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


@pytest.mark.parametrize("start", [64, 256, 4096])
def test_search_brackets_the_limit_from_below_and_above(start):
    probed = []

    def fits(n):
        probed.append(n)
        return n <= 1000

    search = longest_fitting(fits, start, 8192, 16, lambda: 1e9)
    assert search.longest_fitting <= 1000 < search.shortest_failing
    assert search.shortest_failing - search.longest_fitting <= 16
    assert all(n % 16 == 0 or n == start for n in probed)
    assert [p["seq_len"] for p in search.probes] == probed
    assert search.stopped == "bracketed to 16 tokens"


def test_search_stops_at_the_maximum_and_uses_what_is_known():
    probed = []
    search = longest_fitting(lambda n: probed.append(n) or True, 100, 700, 10, lambda: 1e9, start_fits=True)
    assert probed == [200, 400, 700]  # 100 was known to fit: not probed again
    assert search.longest_fitting == 700 and search.shortest_failing is None
    assert search.stopped == "fits at the maximum searched (700)"


def test_search_starts_no_probe_it_has_no_time_for():
    def fits(n):
        time.sleep(0.02)
        return True

    # the first probe always starts; the next one (about 0.04 s: twice as long) does not fit in 0.01 s
    search = longest_fitting(fits, 64, 4096, 8, lambda: 0.01)
    assert [p["seq_len"] for p in search.probes] == [64]
    assert search.longest_fitting == 64
    assert search.stopped.startswith("time: 0 s left, a probe at 128 takes about 0 s")


def test_search_starts_nothing_past_its_time():
    search = longest_fitting(lambda n: pytest.fail("probed past the time limit"), 64, 4096, 8, lambda: -1.0)
    assert search.probes == [] and search.longest_fitting is None
    assert search.stopped == "time: 0 s left, a probe at 64 takes about 0 s"


def test_search_reports_when_nothing_fits():
    search = longest_fitting(lambda n: False, 64, 4096, 16, lambda: 1e9)
    assert search.longest_fitting is None
    assert search.stopped == "nothing from 16 tokens up fits"
    assert [p["seq_len"] for p in search.probes] == [64, 32, 16]


def test_cli_refuses_an_existing_output(tmp_path):
    out = tmp_path / "e2e.json"
    out.write_text("{}")
    result = _run(*TINY, "--out", str(out))
    assert result.returncode == 2
    assert f"--out {out} exists" in result.stderr
    assert out.read_text() == "{}"


def test_cli_tiny_llama_on_cpu_through_both_trainers(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("trl")
    out = tmp_path / "e2e.json"
    result = _run(*TINY, "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["device"] == "cpu" and report["parameters"] > 0
    assert report["environment"]["versions"]["trl"]
    assert set(report["trainers"]) == {"dpo_kernels", "trl"}
    for name, result in report["trainers"].items():
        measured = result["at_seq_len"]
        assert measured["error"] is None, (name, measured["error"])
        assert len(measured["step_s"]) == 2 and all(t > 0 for t in measured["step_s"])
        assert measured["tokens_per_step"] == 2 * 24
        assert measured["tokens_per_s"] == pytest.approx(48 / measured["median_step_s"], rel=1e-3)
        assert "peak_memory_gib" not in measured  # measured on CUDA only
        search = result["longest_seq_len"]
        assert search["longest_fitting"] == 48 and search["stopped"] == "fits at the maximum searched (48)"
        assert [p["seq_len"] for p in search["probes"]] == [24, 48]
