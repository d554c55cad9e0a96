"""The `dpo-kernels` command line: help, the embedded default, errors that say what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from dpo_kernels.train.cli import main  # noqa: E402
from dpo_kernels.train.metrics_log import read_metrics  # noqa: E402


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--model", "--data", "--loss-type", "--beta", "--precompute-ref-logps", "--resume",
                   "--gradient-checkpointing", "sigmoid_norm", "loss (the options of dk.fused_linear_dpo_loss)"):
        assert needle in text


def test_embedded_default_short_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--max-steps", "2", "--batch-pairs", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out reward accuracy" in printed and str(out / "model") in printed
    events = read_metrics(out / "metrics.jsonl")
    assert [(e["step"], e["split"]) for e in events] == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
    assert (out / "plots" / "training.png").is_file()
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (out / "model" / "tokenizer.json").is_file()


def test_user_data_and_loss_options(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"count {i}:", "chosen": " good", "rejected": " bad"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    main(["train", "--data", str(data), "--output-dir", str(out), "--max-steps", "2", "--batch-pairs", "4",
          "--loss-type", "sigmoid", "sft", "--loss-weights", "1.0", "0.5", "--eval-fraction", "0.25",
          "--no-progress", "--no-plots"])
    state = json.loads(next((out / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["config"]["loss_options"]["loss_type"] == ["sigmoid", "sft"]
    assert state["config"]["loss_options"]["loss_weights"] == [1.0, 0.5]
    evals = [e for e in read_metrics(out / "metrics.jsonl") if e["split"] == "eval"]
    assert evals and "rewards/accuracies" in evals[-1]


def test_malformed_data_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "--output-dir", str(tmp_path / "o"), "--no-progress"])
    message = str(exit_info.value.code)
    assert f"{data}:2" in message and "rejected" in message


def test_unavailable_model_is_a_clear_error_and_nothing_is_fetched(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-m", "dpo_kernels.train.cli", "train", "--model", "no-such-org/no-such-model",
         "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "'no-such-org/no-such-model' is not available locally" in result.stderr
    assert "Nothing is downloaded" in result.stderr


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in ("--beta BETA scale of the implicit reward (beta x policy/reference log-ratio) (default: 0.1)",
                   "--batch-pairs BATCH_PAIRS pairs per micro-batch (default: 8; 16 for the embedded default)",
                   "--epochs EPOCHS passes over the training pairs (default: 1.0; 4.0 for the embedded default)",
                   "(default: linear)", "--output-dir OUTPUT_DIR the run directory; it holds one run (default: "
                   "dpo_output)", "--resume [PATH]", "--overwrite", "--split SPLIT", "--eval-split EVAL_SPLIT"):
        assert needle in text
    assert "None" not in text
