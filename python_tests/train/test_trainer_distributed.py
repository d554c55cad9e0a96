"""The trainer under data parallelism (gloo ranks on CPU), replicated or FSDP2-sharded: its steps
equal one process with the same global batch, and a multi-process run can be stopped and resumed
exactly."""

from __future__ import annotations

import pytest
import torch

from dpo_kernels.train.config import TrainConfig
from dpo_kernels.train.metrics_log import read_metrics
from dpo_kernels.train.trainer import DPOTrainer
from python_tests.helpers.distributed import requires_gloo, run_ranks
from python_tests.helpers.training import pairs, tiny_model, tokenizer

pytestmark = requires_gloo

TRAIN_PAIRS = 18  # global batches of 8: the last one of an epoch holds 2 pairs
EVAL_PAIRS = 6


def _trainer(output_dir, batch_pairs, tied=True, **overrides):
    settings = dict(output_dir=str(output_dir), batch_pairs=batch_pairs, learning_rate=3e-3, lr_schedule="linear",
                    max_steps=3, eval_every=2, progress_bar=False, plots=False)
    settings.update(overrides)
    return DPOTrainer(tiny_model(0, tie_word_embeddings=tied), tokenizer(), pairs("train", TRAIN_PAIRS),
                      TrainConfig(**settings), eval_pairs=pairs("eval", EVAL_PAIRS), device="cpu")


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _first_step_gradients(trainer, path):
    """Save the full gradients of the first optimiser step (gathered on every rank when sharded)."""
    def record(optimizer, args, kwargs):
        if trainer.step == 0:
            grads = {name: _full(p.grad).clone() for name, p in trainer.model.named_parameters()}
            if trainer.dp.is_main:
                torch.save(grads, path)
    trainer.optimizer.register_step_pre_hook(record)


def _run_worker(rank, world_size, output_dir, batch_pairs, grads_path, overrides):
    trainer = _trainer(output_dir, batch_pairs, **overrides)
    assert trainer.dp.world_size == world_size and trainer.dp.rank == rank
    _first_step_gradients(trainer, grads_path)
    trainer.train()
    final = {name: _full(p).detach().clone() for name, p in trainer.model.named_parameters()}
    if rank == 0:  # every rank ends with the same weights
        torch.save(final, f"{output_dir}/final-rank0.pt")
    torch.distributed.barrier()
    if rank != 0:
        for name, tensor in torch.load(f"{output_dir}/final-rank0.pt", weights_only=True).items():
            assert torch.equal(final[name], tensor), name


def _events(output_dir):
    return [(e["step"], e["split"], e["loss"], e["rewards/accuracies"])
            for e in read_metrics(output_dir / "metrics.jsonl")]


@pytest.mark.parametrize("world_size,batch_pairs,fsdp2,tied", [
    (2, 4, False, True), (4, 2, False, True), (2, 4, True, True), (2, 4, True, False), (4, 2, True, False)])
def test_data_parallel_steps_equal_one_process_with_the_global_batch(tmp_path, world_size, batch_pairs, fsdp2,
                                                                     tied):
    # 18 pairs in global batches of 8: the third batch holds 2 pairs, so with 4 ranks two of them
    # have nothing of it (they run a pair with weight 0), and eval batches are uneven too
    overrides = {"fsdp2": fsdp2, "tied": tied}
    run_ranks(_run_worker, world_size, tmp_path, str(tmp_path / "dp"), batch_pairs, str(tmp_path / "dp.pt"),
              overrides)
    single = _trainer(tmp_path / "one", batch_pairs * world_size, tied=tied)
    _first_step_gradients(single, str(tmp_path / "one.pt"))
    single.train()
    dp_events, one_events = _events(tmp_path / "dp"), _events(tmp_path / "one")
    assert [e[:2] for e in dp_events] == [e[:2] for e in one_events] == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (3, "eval")]
    for (_, _, loss, acc), (_, _, loss1, acc1) in zip(dp_events, one_events):
        assert loss == pytest.approx(loss1, rel=1e-5) and acc == pytest.approx(acc1, abs=1e-6)
    theirs, ours = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "dp.pt",
                                                                                    weights_only=True)
    assert ours.keys() == theirs.keys()
    scale = max(g.abs().max().item() for g in theirs.values())
    for name, g in theirs.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _stop_worker(rank, world_size, output_dir, fsdp2):
    _trainer(output_dir, 4, max_steps=4, save_every=1, fsdp2=fsdp2).train(stop_after_step=2)


def _resume_worker(rank, world_size, output_dir, fsdp2):
    _trainer(output_dir, 4, max_steps=4, save_every=1, fsdp2=fsdp2).train(resume=True)


def _whole_worker(rank, world_size, output_dir, fsdp2):
    _trainer(output_dir, 4, max_steps=4, save_every=1, fsdp2=fsdp2).train()


@pytest.mark.parametrize("fsdp2", [False, True])
def test_two_rank_run_stops_and_resumes_exactly(tmp_path, fsdp2):
    run_ranks(_whole_worker, 2, tmp_path, str(tmp_path / "whole"), fsdp2)
    run_ranks(_stop_worker, 2, tmp_path, str(tmp_path / "split"), fsdp2)
    assert max(e[0] for e in _events(tmp_path / "split")) == 2
    run_ranks(_resume_worker, 2, tmp_path, str(tmp_path / "split"), fsdp2)
    assert _events(tmp_path / "split") == _events(tmp_path / "whole")
    with pytest.raises(ValueError, match="written by 2 process"):  # same world size only
        _trainer(tmp_path / "split", 4, max_steps=4, save_every=1).resume()
