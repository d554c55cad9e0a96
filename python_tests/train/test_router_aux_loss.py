"""The MoE router load-balancing loss: our trainer adds `router_aux_loss_coef x aux_loss` as TRL
1.16's `DPOTrainer` does, step by step on tiny Mixtral and Qwen2-MoE models; it logs `aux_loss`
and can be turned off (`router_aux_loss=False`, `--no-router-aux-loss`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("trl")

from dpo_kernels.train.config import TrainConfig  # noqa: E402
from dpo_kernels.train.default_dataset import default_dataset_path  # noqa: E402
from dpo_kernels.train.metrics_log import read_metrics  # noqa: E402
from dpo_kernels.train.trainer import DPOTrainer  # noqa: E402
from python_tests.helpers import model_zoo  # noqa: E402
from python_tests.helpers.training import pairs, tokenizer  # noqa: E402
from python_tests.helpers.trl_training import train_with_trl  # noqa: E402

RECORDS = 16
BATCH = 8
STEPS = 3
LR = 3e-3
MOE = {"mixtral": dict(router_aux_loss_coef=0.02), "qwen2_moe": dict(router_aux_loss_coef=0.05)}


def _moe(model_type):
    return model_zoo.tiny_model(model_type, vocab_size=len(tokenizer()), **MOE[model_type])


def _our_run(tmp_path, model, **settings):
    config = TrainConfig(output_dir=str(tmp_path), batch_pairs=BATCH, learning_rate=LR, lr_schedule="constant",
                         max_steps=STEPS, shuffle=False, mixed_precision="no", progress_bar=False, plots=False,
                         **settings)
    DPOTrainer(model, tokenizer(), pairs("train", RECORDS), config, device="cpu").train()
    return [e for e in read_metrics(tmp_path / "metrics.jsonl") if e["split"] == "train"]


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_losses_with_router_aux_loss_agree_with_trl(tmp_path, model_type):
    lines = default_dataset_path("train").read_text().splitlines()[:RECORDS]
    records = [json.loads(line) for line in lines]
    theirs = train_with_trl(_moe(model_type), tokenizer(), records, steps=STEPS, batch_pairs=BATCH, lr=LR, beta=0.1,
                            loss_type="sigmoid", seed=0, output_dir=str(tmp_path / "trl"), use_dk=False)
    ours = _our_run(tmp_path / "ours", _moe(model_type))
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a["loss"] == pytest.approx(b, rel=1e-5 * step), f"step {step}: ours {a['loss']}, TRL {b}"
    coef = MOE[model_type]["router_aux_loss_coef"]
    assert all(e["aux_loss"] > 0.5 for e in ours)  # the load-balancing loss of top-2 routing is ~1 at init
    assert ours[0]["loss"] - coef * ours[0]["aux_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_router_aux_loss_off(tmp_path):
    on = _our_run(tmp_path / "on", _moe("mixtral"))
    off = _our_run(tmp_path / "off", _moe("mixtral"), router_aux_loss=False)
    assert "aux_loss" not in off[0]
    coef = MOE["mixtral"]["router_aux_loss_coef"]
    assert off[0]["loss"] == pytest.approx(on[0]["loss"] - coef * on[0]["aux_loss"], abs=1e-6)


def test_cli_flag_turns_it_off(tmp_path):
    model_dir = tmp_path / "moe"
    _moe("mixtral").save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dpo_kernels.train.cli", "train", "--model", str(model_dir), "--data",
         str(default_dataset_path("train")), "--eval-fraction", "0", "--max-steps", "1", "--batch-pairs", "4",
         "--output-dir", str(out), "--no-router-aux-loss", "--no-progress", "--no-plots", "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    train = [e for e in read_metrics(out / "metrics.jsonl") if e["split"] == "train"]
    assert train and "aux_loss" not in train[0]
