"""Run directories as a user meets them, through `dpo-kernels train` in a subprocess where that is
the user's path (the other runs call `main` in this process, which costs no interpreter start): a
second run is refused, `--resume` needs only the directory, a finished run is extended, a broken
checkpoint is skipped or refused by name, and SIGINT/SIGTERM leave a checkpoint that resumes bit
for bit."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from dpo_kernels.train.checkpoint import list_checkpoints, newest_intact_checkpoint  # noqa: E402
from dpo_kernels.train.cli import main  # noqa: E402
from dpo_kernels.train.metrics_log import read_metrics  # noqa: E402

# the embedded default, small batches, a constant schedule (its warmup is the same for any length)
RUN = ["--batch-pairs", "4", "--lr-schedule", "constant", "--no-progress", "--no-plots"]
COMMAND = [sys.executable, "-m", "dpo_kernels.train.cli", "train"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(COMMAND + [str(a) for a in args], capture_output=True, text=True, timeout=600)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _rows(directory: Path, split: str = "train") -> list:
    return [(e["step"], e["loss"]) for e in read_metrics(directory / "metrics.jsonl") if e["split"] == split]


def _error_lines(stderr: str) -> list:
    """The lines of stderr other than the run's progress messages."""
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 10-step run (checkpoints at 5 and 10), extended by `--resume --max-steps 20` alone, and a
    20-step run of the same settings in one go."""
    base = tmp_path_factory.mktemp("runs")
    run, whole = base / "run", base / "whole"
    _ok(_cli("--output-dir", run, "--max-steps", 10, "--save-every", 5, *RUN))
    first = _snapshot(run)
    second = _cli("--output-dir", run, "--max-steps", 10, "--save-every", 5, *RUN)
    assert _snapshot(run) == first  # byte for byte
    extended = _ok(_cli("--output-dir", run, "--resume", "--max-steps", 20))
    assert main(["train", "--output-dir", str(whole), "--max-steps", "20", "--save-every", "5", *RUN]) == 0
    return dict(run=run, whole=whole, second=second, extended=extended,
                weights_bytes=len(first["checkpoints/step-00000010/model.safetensors"]))


def test_a_second_run_in_the_directory_is_refused_and_changes_nothing(finished, tmp_path):
    second = finished["second"]
    assert second.returncode == 1 and "Traceback" not in second.stderr
    (message,) = _error_lines(second.stderr)
    assert "already holds a run (run.json, metrics.jsonl, checkpoints/, model/)" in message
    assert "--resume" in message and "--overwrite" in message
    # (the fixture checked that the refused run left the directory byte for byte as it was)
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    before = _snapshot(run)
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--output-dir", str(run), "--max-steps", "2", *RUN])
    assert _snapshot(run) == before
    # --overwrite removes the old run's files first: nothing of it is left to mix with the new one
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--output-dir", str(run), "--overwrite", "--max-steps", "2", *RUN]) == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002"]
    assert [s for s, _ in _rows(run)] == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_with_only_the_directory_extends_a_finished_run(finished):
    run, whole = finished["run"], finished["whole"]
    assert "resumed from" in finished["extended"].stderr and "step-00000010" in finished["extended"].stderr
    assert [s for s, _ in _rows(run)] == list(range(1, 21))
    assert _rows(run)[10:] == _rows(whole)[10:]  # steps 11-20, bit for bit
    assert read_metrics(run / "metrics.jsonl") == read_metrics(whole / "metrics.jsonl")
    record = json.loads((run / "run.json").read_text())
    assert record["settings"]["max_steps"] == 20
    assert record["resumes"] == [{"checkpoint": "newest", "changed": {"max_steps": [10, 20]}}]


def test_resume_of_a_finished_run_says_so_and_writes_nothing(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    before = _snapshot(run)
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    assert "finished at step 20 of 20: nothing left to do" in capsys.readouterr().out
    assert _snapshot(run) == before


def test_resume_refuses_settings_that_change_the_steps_taken(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    before = _snapshot(run)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", str(run), "--resume", "--max-steps", "30", "--learning-rate", "0.1",
              "--loss-type", "ipo", "--eval-every", "5"])
    message = str(exit_info.value.code)
    assert "  --learning-rate: 0.002 in the run, 0.1 given\n" in message
    assert "  --loss-type: sigmoid in the run, ipo given\n" in message
    assert "eval-every" not in message and "max-steps" not in message  # those may change
    assert _snapshot(run) == before


def test_truncated_weights_fall_back_to_the_previous_checkpoint(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    weights = run / "checkpoints" / "step-00000020" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = _ok(_cli("--output-dir", run, "--resume", "--max-steps", 22))
    warnings = [line for line in result.stderr.splitlines() if "broken" in line]
    assert warnings == [f"dpo-kernels: skipping a broken checkpoint: {weights}: 1000 bytes where manifest.json "
                        f"records {finished['weights_bytes']} "
                        "(truncated or altered)"]
    assert "resumed from" in result.stderr and "step-00000015 at step 15" in result.stderr
    assert [s for s, _ in _rows(run)] == list(range(1, 23))
    assert _rows(run)[:20] == _rows(finished["whole"])  # steps 16-20 taken again, as the first time
    assert newest_intact_checkpoint(run / "checkpoints")[1] == []  # step 20 written again, intact


def test_flipped_byte_in_the_optimizer_state_is_refused_by_name(finished, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    state = run / "checkpoints" / "step-00000020" / "optimizer.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    before = _snapshot(run)
    reason = f"{state}: its sha256 differs from the one in manifest.json (altered)"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(run / "checkpoints" / "step-00000020"), "--max-steps", "21"])
    assert exit_info.value.code == f"dpo-kernels: {reason}"
    assert _snapshot(run) == before  # a failed resume deletes or rewrites nothing
    # without a path, the newest intact checkpoint is taken instead, and the broken one named
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "21"]) == 0
    assert f"skipping a broken checkpoint: {reason}" in caplog.text
    assert "step-00000015 at step 15" in caplog.text


def test_resume_from_a_given_checkpoint(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    assert main(["train", "--resume", str(run / "checkpoints" / "step-00000015")]) == 0  # the run is its parent
    assert read_metrics(run / "metrics.jsonl") == read_metrics(finished["whole"] / "metrics.jsonl")
    with pytest.raises(SystemExit, match="is a checkpoint of the run in .* not of --output-dir"):
        main(["train", "--output-dir", str(tmp_path / "other"), "--resume", str(run / "checkpoints" / "step-00000015")])


def test_resume_without_a_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(SystemExit, match="no such directory: there is no run to resume"):
        main(["train", "--output-dir", str(tmp_path / "none"), "--resume"])
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "1", *RUN]) == 0
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(SystemExit, match=f"no checkpoint in {run / 'checkpoints'}: nothing to resume"):
        main(["train", "--output-dir", str(run), "--resume"])
    with pytest.raises(SystemExit, match="--resume continues the run .* --overwrite deletes it"):
        main(["train", "--output-dir", str(run), "--resume", "--overwrite"])


@pytest.fixture(scope="module")
def twenty_steps(tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole") / "run"
    assert main(["train", "--output-dir", str(whole), "--max-steps", "20", *RUN]) == 0
    return whole


def _wait_for(predicate, process, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _has_a_step(run: Path) -> bool:
    path = run / "metrics.jsonl"
    return path.is_file() and '"split": "train"' in path.read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path, twenty_steps, signum):
    run = tmp_path / "run"
    process = subprocess.Popen(COMMAND + ["--output-dir", str(run), "--max-steps", "400", *RUN],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _has_a_step(run), process, "training step")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    last = _error_lines(stderr)[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"dpo-kernels: stopped by {name} at step ") and "--resume" in last
    (checkpoint,) = list_checkpoints(run / "checkpoints")
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < 20, "the signal arrived too late for this test"
    assert [s for s, _ in _rows(run)] == list(range(1, step + 1))

    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "20"]) == 0
    assert read_metrics(run / "metrics.jsonl") == read_metrics(twenty_steps / "metrics.jsonl")
    assert (run / "model" / "model.safetensors").read_bytes() == \
        (twenty_steps / "model" / "model.safetensors").read_bytes()


def test_argument_errors_change_no_run_directory(tmp_path):
    out = tmp_path / "out"
    for argv, message in [
        (["--model", "./does-not-exist"], "--model ./does-not-exist: no such directory"),
        (["--data", str(tmp_path / "x.json"), "--split", "train", "--model", str(tmp_path)],
         "the directory has no config.json"),
        (["--backend", "cuda"], "--backend cuda: cannot run on"),
        (["--device", "tpu:0"], "--device 'tpu:0': not a device (expected cpu, cuda or cuda:N)"),
        (["--device", "meta"], "--device meta: the trainer runs on cpu or cuda"),
        (["--split", "train"], "--split needs --data"),
        (["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--output-dir", str(out), *argv])
        assert message in str(exit_info.value.code)
    assert not out.exists()
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: CUDA is not available on this machine"):
            main(["train", "--output-dir", str(out), "--device", "cuda"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="has config.json but no weights"):
        main(["train", "--output-dir", str(out), "--model", str(tmp_path)])
    assert not out.exists()


def test_json_splits_and_a_one_pair_dataset(tmp_path):
    rows = [{"prompt": f"count {i}:", "chosen": " good", "rejected": " bad"} for i in range(10)]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps({"train": rows[:8], "test": rows[8:]}))
    with pytest.raises(SystemExit, match=r"has splits \['train', 'test'\]: pass --split to choose one"):
        main(["train", "--data", str(data), "--output-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"--split 'dev' not found"):
        main(["train", "--data", str(data), "--split", "dev", "--output-dir", str(tmp_path / "a")])
    out = tmp_path / "b"
    assert main(["train", "--data", str(data), "--split", "train", "--eval-split", "test", "--output-dir", str(out),
                 "--max-steps", "1", "--batch-pairs", "4", "--no-progress", "--no-plots"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["split"] == "train" and record["settings"]["eval_split"] == "test"
    assert [e["split"] for e in read_metrics(out / "metrics.jsonl")] == ["eval", "train", "eval"]

    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SystemExit, match=r"--eval-fraction 0.1 of 1 pair\(s\) holds out 1 and leaves no training "
                                         r"pair"):
        main(["train", "--data", str(one), "--output-dir", str(tmp_path / "c")])
    assert main(["train", "--data", str(one), "--eval-fraction", "0", "--output-dir", str(tmp_path / "c"),
                 "--max-steps", "1", "--no-progress", "--no-plots"]) == 0
