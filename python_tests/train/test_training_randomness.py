"""Policy (training mode) and reference (eval mode) compute the same function at step 0, so the
first sigmoid loss is ln 2: dropout off through modules, module attributes and config fields
(OPT, XGLM, GPTBigCode call functional dropout with the config's rate), router noise off and
sampling routers (PhiMoE) pinned to eval mode."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_kernels.train.config import TrainConfig
from dpo_kernels.train.model_quirks import disable_training_randomness
from dpo_kernels.train.trainer import DPOTrainer
from python_tests.helpers import model_zoo
from python_tests.helpers.training import pairs, tokenizer

PAIRS = 4
RANDOM_IN_TRAINING = [
    ("opt", dict(dropout=0.2, attention_dropout=0.2, activation_dropout=0.2, layerdrop=0.5)),
    ("xglm", dict(dropout=0.2, attention_dropout=0.2, activation_dropout=0.2, layerdrop=0.5)),
    ("gpt_bigcode", dict(resid_pdrop=0.2, attn_pdrop=0.2, embd_pdrop=0.2)),
    ("phimoe", dict(input_jitter_noise=0.2, attention_dropout=0.2)),  # and Gumbel-sampled routes
    ("mixtral", dict(router_jitter_noise=0.2, attention_dropout=0.2)),
]


def _first_loss(tmp_path, model, **settings) -> float:
    config = TrainConfig(output_dir=str(tmp_path), batch_pairs=PAIRS, max_steps=1, mixed_precision="no",
                         router_aux_loss=False, progress_bar=False, plots=False, **settings)
    trainer = DPOTrainer(model, tokenizer(), pairs("train", PAIRS), config, device="cpu")
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._batch(trainer.train_pairs, trainer.global_micro_batch(0))
    return trainer.compute_loss(batch).loss.item()


def _model(model_type, overrides):
    return model_zoo.tiny_model(model_type, vocab_size=len(tokenizer()), **overrides)


@pytest.mark.parametrize("model_type,overrides", RANDOM_IN_TRAINING, ids=[m for m, _ in RANDOM_IN_TRAINING])
def test_first_sigmoid_loss_is_ln2(tmp_path, model_type, overrides):
    assert _first_loss(tmp_path, _model(model_type, overrides)) == pytest.approx(math.log(2), abs=1e-6)


def test_with_dropout_left_on_the_first_loss_is_not_ln2(tmp_path):
    """The test above can fail: OPT with its dropout left on (as `nn.Dropout`-only disabling leaves
    the functional dropout of its attention and layers)."""
    loss = _first_loss(tmp_path, _model(*RANDOM_IN_TRAINING[0]), disable_dropout=False)
    assert abs(loss - math.log(2)) > 1e-4


def test_rates_are_zeroed_in_modules_and_configs():
    model = _model(*RANDOM_IN_TRAINING[0])
    disable_training_randomness(model)
    config = model.config
    assert (config.dropout, config.attention_dropout, config.activation_dropout, config.layerdrop) == (0, 0, 0, 0)
    rates = [value for module in model.modules() for name, value in vars(module).items()
             if isinstance(value, float) and ("dropout" in name or "layerdrop" in name)]
    assert rates and not any(rates)


def test_phimoe_router_stays_in_eval_mode_and_its_threshold_is_kept():
    model = _model(*RANDOM_IN_TRAINING[3])
    threshold = model.config.router_jitter_noise  # sparsemixer's masking threshold, in both modes
    disable_training_randomness(model)
    model.train()
    routers = [m for m in model.modules() if type(m).__name__ == "PhimoeTopKRouter"]
    assert routers
    ids = torch.randint(3, 100, (2, 8))
    model(input_ids=ids)
    assert all(not router.training and router.router_jitter_noise == threshold for router in routers)
    assert all(router.input_jitter_noise == 0.0 for router in routers)
