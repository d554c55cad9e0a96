"""benchmarks/gpu_run.sh in its dry run (DRY_RUN=1: every GPU command replaced by `sleep`): the plans'
caps sum to the budget, steps run under their limits, a step past its limit is stopped, steps that the
remaining time cannot cover are skipped, and every call leaves its summary and bundle in $OUT."""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAN_A = ["install", "peer-wheels", "environment", "gpu-tests", "sanitizer-memcheck", "sanitizer-racecheck",
          "ceilings", "bench-centre-logits", "bench-centre-linear", "report"]
PLAN_B = ["install", "peer-wheels", "environment", "end-to-end", "bench-rest-logits", "bench-rest-linear", "report"]


def _run(tmp_path, *args, **env):
    variables = {k: v for k, v in os.environ.items() if k not in ("BUDGET", "CAPS", "SKIP", "ONLY")}
    variables.update(OUT=str(tmp_path / "out"), RUN_DIR=str(tmp_path / "run"), DRY_RUN="1", **env)
    began = time.monotonic()
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh", *args], cwd=ROOT, env=variables, capture_output=True,
                            text=True, timeout=120)
    return result, time.monotonic() - began


def _summary_rows(tmp_path, part):
    lines = (tmp_path / "out" / f"gpu-run-{part}-summary.txt").read_text().splitlines()[2:]
    return {line.split()[0]: line for line in lines}


@pytest.mark.parametrize("part,plan,budget", [("a", PLAN_A, 350), ("b", PLAN_B, 310)])
def test_plan_sums_to_the_budget_and_every_step_runs(tmp_path, part, plan, budget):
    result, _ = _run(tmp_path, part)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"caps sum to {budget - 10}s of the {budget - 10}s for steps" in result.stdout
    planned = re.findall(r"^   (\S+)\s+(\d+)\s+(\d+)\s+(\d+)s$", result.stdout, flags=re.M)
    assert [name for name, *_ in planned] == plan
    assert sum(int(cap) for _, cap, _, _ in planned) == budget - 10
    rows = _summary_rows(tmp_path, part)
    assert list(rows) == plan and all(row.endswith(" ok") for row in rows.values())
    with tarfile.open(tmp_path / "out" / f"gpu-run-{part}.tar.gz") as bundle:
        names = {Path(n).name for n in bundle.getnames()}
    assert {f"{name}.log" for name in plan} | {"summary.txt", "plan.txt"} <= names


def test_a_step_past_its_limit_is_stopped_and_later_steps_fit_what_is_left(tmp_path):
    # install may take 1 s but sleeps 3; 22 s of budget, 10 reserved, 5 s of grace per step
    result, seconds = _run(tmp_path, "b", BUDGET="22", CAPS="install=1", DRY_STEP_SECONDS="3", SKIP="environment")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = _summary_rows(tmp_path, "b")
    assert "stopped at its 1s limit (exit 124)" in rows["install"]
    # 22 - 10 reserved - 1 used - 5 of grace (one more second used when the clock ticked over)
    assert rows["peer-wheels"].split()[1] in ("6s", "5s") and rows["peer-wheels"].endswith(" ok")
    assert "skipped (SKIP/ONLY)" in rows["environment"]
    for name in ("end-to-end", "report"):
        assert "skipped:" in rows[name] and "s left" in rows[name], rows[name]
    for name in ("bench-rest-logits", "bench-rest-linear"):  # they share what the other caps leave: nothing
        assert "skipped: the plan leaves it no time (cap 0s)" in rows[name]
    assert seconds < 22


def test_benchmark_steps_share_what_the_other_caps_leave(tmp_path):
    result, _ = _run(tmp_path, "b", CAPS="end-to-end=101")
    planned = dict((name, int(cap)) for name, cap in re.findall(r"^   (\S+)\s+(\d+)\s+\d+\s+\d+s$", result.stdout,
                                                                 flags=re.M))
    assert planned["end-to-end"] == 101
    # (300 - 80 - 10 - 10 - 101 - 10) / 2, the odd second to the last
    assert (planned["bench-rest-logits"], planned["bench-rest-linear"]) == (44, 45)
    assert sum(planned.values()) == 300


def test_usage_error_names_the_parts(tmp_path):
    result, _ = _run(tmp_path, "c")
    assert result.returncode == 2
    assert "gpu_run.sh a|b" in result.stderr
    assert not (tmp_path / "out").exists()
