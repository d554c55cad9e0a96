"""DPOTrainer on a tiny Llama over the default tokenizer and the shipped pairs: learning, the
reference sources, gradient accumulation, checkpoints, exact resume, extension and signals."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from dpo_kernels.train import reference_logps
from dpo_kernels.train.checkpoint import list_checkpoints, newest_intact_checkpoint, verify_checkpoint
from dpo_kernels.train.config import TrainConfig
from dpo_kernels.train.interrupts import StoppedAtOnce, TrainingInterrupted
from dpo_kernels.train.lr_schedule import lr_factor
from dpo_kernels.train.metrics_log import read_metrics
from dpo_kernels.train.trainer import DPOTrainer
from python_tests.helpers.training import pairs, tiny_model, tokenizer


def _config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), batch_pairs=8, learning_rate=3e-3, lr_schedule="constant",
                    max_steps=4, progress_bar=False, plots=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def _trainer(tmp_path, train=32, evals=16, seed=0, **overrides):
    return DPOTrainer(tiny_model(seed), tokenizer(), pairs("train", train), _config(tmp_path, **overrides),
                      eval_pairs=pairs("eval", evals) if evals else None, device="cpu")


def _losses(output_dir, split="train", key="loss"):
    return [(e["step"], e[key]) for e in read_metrics(output_dir / "metrics.jsonl") if e["split"] == split]


def test_loss_falls_and_held_out_accuracy_rises(tmp_path):
    trainer = _trainer(tmp_path, train=64, evals=32, max_steps=16, eval_every=8)
    final = trainer.train()
    train = [loss for _, loss in _losses(tmp_path)]
    assert train[0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at step 1
    assert sum(train[-4:]) / 4 < train[0] - 0.05
    evals = _losses(tmp_path, "eval", "rewards/accuracies")
    assert [s for s, _ in evals] == [0, 8, 16]
    assert evals[0][1] == 0.0  # ties at step 0: no pair counts as won
    assert final["rewards/accuracies"] > 0.6
    assert (tmp_path / "model" / "config.json").is_file()
    assert list((tmp_path / "model").glob("*.safetensors"))


def test_plots_are_written(tmp_path):
    _trainer(tmp_path, train=16, evals=8, max_steps=2, plots=True).train()
    png = tmp_path / "plots" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_precomputed_reference_equals_live_reference(tmp_path, monkeypatch):
    live = _trainer(tmp_path / "live")
    live.train()
    cached = _trainer(tmp_path / "cached", precompute_ref_logps=True, ref_cache_dir=str(tmp_path / "cache"))
    cached.train()
    assert cached.ref_model is None  # freed after scoring
    for (s1, a), (s2, b) in zip(_losses(tmp_path / "live"), _losses(tmp_path / "cached")):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-7)
    files = list((tmp_path / "cache").glob("ref_logps-*.safetensors"))
    assert len(files) == 2  # train and eval splits

    # a second run with the same model and data loads the cache and never scores the reference
    def refuse(*args, **kwargs):
        raise AssertionError("reference scored although its log-probs are cached")
    monkeypatch.setattr(reference_logps, "reference_sequence_logps", refuse)
    again = _trainer(tmp_path / "again", precompute_ref_logps=True, ref_cache_dir=str(tmp_path / "cache"))
    again.train()
    assert _losses(tmp_path / "again") == _losses(tmp_path / "cached")

    # another reference model gets another key
    other = DPOTrainer(tiny_model(0), tokenizer(), pairs("train", 32),
                       _config(tmp_path / "other", precompute_ref_logps=True, ref_cache_dir=str(tmp_path / "cache")),
                       ref_model=tiny_model(1), device="cpu")
    with pytest.raises(AssertionError, match="reference scored"):
        other.train()


def _record_gradients(trainer):
    """Capture the gradients each optimiser step applies (Adam's update of a near-zero gradient is
    +-lr whatever its rounding, so parameters are a poor witness; gradients are the quantity)."""
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([p.grad.clone() for p in trainer.model.parameters()]))
    return seen


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    big = _trainer(tmp_path / "big", batch_pairs=16, max_steps=3, shuffle=False)
    big_grads = _record_gradients(big)
    big.train()
    small = _trainer(tmp_path / "small", batch_pairs=8, grad_accumulation=2, max_steps=3, shuffle=False)
    small_grads = _record_gradients(small)
    small.train()
    for (_, a), (_, b) in zip(_losses(tmp_path / "big"), _losses(tmp_path / "small")):
        assert a == pytest.approx(b, rel=1e-5)
    assert len(big_grads) == len(small_grads) == 3
    for g, h in zip(big_grads[0], small_grads[0]):  # same parameters, same pairs: same gradient
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6 * big_grads[0][0].abs().max().item())


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    settings = dict(max_steps=6, lr_schedule="linear", warmup_steps=2, eval_every=3)
    whole = _trainer(tmp_path / "whole", **settings)
    whole.train()

    first = _trainer(tmp_path / "split", **settings)
    first.train(stop_after_step=3)
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step-00000003"]
    second = _trainer(tmp_path / "split", **settings)  # a fresh process would build the same objects
    second.train(resume=True)
    assert second.step == 6
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    assert _losses(tmp_path / "split", "eval") == _losses(tmp_path / "whole", "eval")
    for p, q in zip(whole.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)


def test_resume_refuses_other_settings_data_or_reference(tmp_path):
    _trainer(tmp_path, max_steps=4).train(stop_after_step=2)
    with pytest.raises(ValueError, match="setting learning_rate"):
        _trainer(tmp_path, max_steps=4, learning_rate=1e-2).train(resume=True)
    with pytest.raises(ValueError, match="training pairs differ"):
        _trainer(tmp_path, train=24, max_steps=4).train(resume=True)
    with pytest.raises(ValueError, match="reference model differs"):
        _trainer(tmp_path, seed=1, max_steps=4).train(resume=True)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, save_every=1, keep_checkpoints=2)
    trainer.train()
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000003", "step-00000004"]
    # a crash while writing leaves a temporary directory, which is never taken for a checkpoint
    (checkpoints / ".tmp-step-00000005-123").mkdir()
    (checkpoints / "step-00000009").mkdir()  # no manifest: skipped, and named
    path, skipped = newest_intact_checkpoint(checkpoints)
    assert path.name == "step-00000004"
    assert skipped == [f"{checkpoints / 'step-00000009' / 'manifest.json'}: missing (the checkpoint is incomplete, "
                       "or from a version without checksums)"]
    state = json.loads((checkpoints / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["max_steps"] == 4


def test_checkpoint_loading_never_unpickles(tmp_path, monkeypatch):
    _trainer(tmp_path, max_steps=2).train(stop_after_step=1)
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    _trainer(tmp_path, max_steps=2).train(resume=True)
    assert calls and all(flag is True for flag in calls)


@pytest.mark.parametrize("loss_type", ["ipo", ["sigmoid", "sft"]])
def test_other_loss_types_and_options_train(tmp_path, loss_type):
    options = {"beta": 0.1, "loss_type": loss_type, "ld_alpha": 0.5}
    if loss_type == "ipo":
        options["use_weighting"] = True
    trainer = _trainer(tmp_path, max_steps=3, evals=0, loss_options=options)
    last = trainer.train()
    assert math.isfinite(last["loss"]) and last["grad_norm"] > 0


def test_reference_free_makes_no_reference_model(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, evals=0, loss_options={"beta": 0.1, "reference_free": True})
    assert trainer.ref_model is None
    trainer.train()
    assert len(_losses(tmp_path)) == 2


def test_eager_backward_trains_like_the_default_path(tmp_path):
    default = _trainer(tmp_path / "default", max_steps=3, evals=8)
    default.train()
    eager = _trainer(tmp_path / "eager", max_steps=3, evals=8, eager_backward=True)
    eager.train()
    for (s1, a), (s2, b) in zip(_losses(tmp_path / "default"), _losses(tmp_path / "eager")):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    with pytest.raises(ValueError, match="eager_backward=True needs loss types"):
        TrainConfig(eager_backward=True, loss_options={"beta": 0.1, "loss_type": ["sigmoid", "sft"]})


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(TypeError, match="unknown loss option"):
        TrainConfig(loss_options={"bta": 0.1})
    with pytest.raises(ValueError, match="batch_pairs"):
        TrainConfig(batch_pairs=0)
    with pytest.raises(ValueError, match="train_pairs is empty"):
        DPOTrainer(tiny_model(), tokenizer(), [], TrainConfig(), device="cpu")


def test_extending_a_decaying_schedule_recomputes_it_for_the_new_length(tmp_path, caplog):
    settings = dict(lr_schedule="linear", warmup_steps=2, evals=0)
    _trainer(tmp_path, max_steps=4, **settings).train()
    resumed = _trainer(tmp_path, max_steps=8, **settings)
    resumed.train(resume=True)
    rates = {e["step"]: e["learning_rate"] for e in read_metrics(tmp_path / "metrics.jsonl")}
    assert rates[4] == pytest.approx(3e-3 * lr_factor(3, warmup_steps=2, total_steps=4, schedule="linear"))
    for step in range(5, 9):  # the steps after the resume follow the 8-step schedule
        assert rates[step] == pytest.approx(3e-3 * lr_factor(step - 1, warmup_steps=2, total_steps=8,
                                                             schedule="linear"))
    assert "the run had 4 steps and now has 8: its linear learning-rate schedule is recomputed" in caplog.text


def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=6, evals=0)
    take_step = trainer._train_step

    def step_then_signal():
        metrics = take_step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics
    monkeypatch.setattr(trainer, "_train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    assert (stop.value.signum, stop.value.step) == (signal.SIGTERM, 2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_a_second_signal_stops_at_once_and_leaves_the_checkpoints_intact(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=6, evals=0, save_every=1, keep_checkpoints=5)
    take_step, save = trainer._train_step, torch.save

    def step_then_signal():
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # asks for a checkpoint after step 3
        return take_step()

    def save_then_signal(obj, path, *args, **kwargs):
        if "step-00000003" in str(path):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while step 3 is being written
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(trainer, "_train_step", step_then_signal)
    monkeypatch.setattr(torch, "save", save_then_signal)
    with pytest.raises(StoppedAtOnce):
        trainer.train()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001", "step-00000002"]  # no debris
    for path in list_checkpoints(checkpoints):
        verify_checkpoint(path)
    monkeypatch.undo()
    resumed = _trainer(tmp_path, max_steps=6, evals=0, save_every=1, keep_checkpoints=5)
    resumed.train(resume=True)
    assert [s for s, _ in _losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_new_run_refuses_a_directory_holding_another(tmp_path):
    _trainer(tmp_path, max_steps=1, evals=0).train()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds a run"):
        _trainer(tmp_path, max_steps=1, evals=0).train()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
