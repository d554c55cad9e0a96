"""Our trainer against TRL 1.16's own `DPOTrainer`: the same tiny model, data, seed, batch, learning
rate and loss give the same loss at every step (TRL's settings: see python_tests/helpers/trl_training.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

from dpo_kernels.train.config import TrainConfig  # noqa: E402
from dpo_kernels.train.default_dataset import default_dataset_path  # noqa: E402
from dpo_kernels.train.metrics_log import read_metrics  # noqa: E402
from dpo_kernels.train.trainer import DPOTrainer  # noqa: E402
from python_tests.helpers.training import pairs, tiny_model, tokenizer  # noqa: E402
from python_tests.helpers.trl_training import train_with_trl  # noqa: E402

RECORDS = 24
BATCH = 8
STEPS = 5  # three batches per epoch: the run crosses an epoch boundary
LR = 3e-3


def _our_losses(tmp_path, loss_type, tied):
    config = TrainConfig(output_dir=str(tmp_path), batch_pairs=BATCH, learning_rate=LR, lr_schedule="constant",
                         max_steps=STEPS, shuffle=False, max_grad_norm=1.0, mixed_precision="no",
                         loss_options={"beta": 0.1, "loss_type": loss_type}, progress_bar=False, plots=False)
    trainer = DPOTrainer(tiny_model(0, tie_word_embeddings=tied), tokenizer(), pairs("train", RECORDS), config,
                         device="cpu")
    trainer.train()
    return [e["loss"] for e in read_metrics(tmp_path / "metrics.jsonl") if e["split"] == "train"]


@pytest.mark.parametrize("loss_type,tied", [("sigmoid", True), (["sigmoid", "sft"], False), ("ipo", True)])
def test_losses_agree_with_trl_step_by_step(tmp_path, loss_type, tied):
    lines = default_dataset_path("train").read_text().splitlines()[:RECORDS]
    records = [json.loads(line) for line in lines]
    theirs = train_with_trl(tiny_model(0, tie_word_embeddings=tied), tokenizer(), records, steps=STEPS,
                            batch_pairs=BATCH, lr=LR, beta=0.1, loss_type=loss_type, seed=0,
                            output_dir=str(tmp_path / "trl"), use_dk=False)
    ours = _our_losses(tmp_path / "ours", loss_type, tied)
    assert len(ours) == len(theirs) == STEPS
    # step 1 sees identical weights; later steps inherit the previous updates' fp32 rounding
    assert ours[0] == pytest.approx(theirs[0], rel=2e-6)
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a == pytest.approx(b, rel=1e-5 * step), f"step {step}: ours {a}, TRL {b}"
    assert ours[-1] < ours[0]  # and it is learning, not agreeing on a constant
