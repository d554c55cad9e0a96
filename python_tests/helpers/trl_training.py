"""Train a model with TRL 1.16's `DPOTrainer` (its own log-prob kernel, or ours through
`dpo_kernels.integrations.trl.DPOTrainer`) and return the training loss of every optimiser step:
the yardstick other trainers are compared with step by step.

Every setting that decides the numbers, so another trainer can mirror them (all else is left at the
`DPOConfig` / `TrainingArguments` default, none of which changes the numbers here):

- Precision and device: fp32 throughout (`bf16=False`, `fp16=False`: DPOConfig would otherwise turn
  bf16 on), no autocast, CPU (`use_cpu=True`), no activation checkpointing (DPOConfig's default is
  on; it would not change the numbers, only the time).
- Optimiser: `optim="adamw_torch"`, i.e. `torch.optim.AdamW(lr=lr, betas=(0.9, 0.999), eps=1e-8,
  weight_decay=0.0)` over all trainable parameters (HF puts biases and norm weights in a no-decay
  group; with weight decay 0 that changes nothing).
- Gradient clipping: `max_grad_norm` (default 1.0, the HF default): the total L2 norm over all
  trainable parameters is clipped to it before each step (`torch.nn.utils.clip_grad_norm_`); None or
  0 disables it.
- Learning rate: `lr_scheduler_type="constant"`, `warmup_steps=0`: every step uses `lr`.
- Steps and batches: `max_steps=steps`, `gradient_accumulation_steps=1`,
  `per_device_train_batch_size=batch_pairs` (pairs: the model sees `2 * batch_pairs` rows, the
  chosen completions then the rejected ones), `dataloader_drop_last=False`.
- Data order: no shuffling (`train_sampling_strategy="sequential"`): step k (from 0) trains on
  records `[k * batch_pairs, (k + 1) * batch_pairs)`; after the last record the next epoch starts
  again from record 0 (a last short batch is kept, and the epoch boundary is not crossed within a
  batch).
- Tokenisation: TRL's (prompt and completion tokenised separately, EOS appended to each completion,
  `max_length=None`: no truncation, right padding with `tokenizer.pad_token_id`, no
  `pad_to_multiple_of`); loss over completion tokens only.
- Reference: `ref_model` is a frozen deep copy of the initial model, scored on every batch under
  `torch.no_grad()` in eval mode (`precompute_ref_log_probs=False`); since it never changes and has
  no dropout, this equals log-probs precomputed once.
- Dropout: `disable_dropout=True` sets every dropout probability of policy and reference to 0; the
  policy is in train mode during the steps.
- Seed: `seed` (the Trainer calls `transformers.set_seed(seed)` when built); with sequential data
  and no dropout nothing random remains.
- Logging: `report_to=[]`, `logging_steps=1`, `save_strategy="no"`, `disable_tqdm=True`.

The loss recorded for a step is the scalar `compute_loss` returns for that step's batch (before
backward and the optimiser step), as a Python float. The caller's model is not modified: policy and
reference are deep copies.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import List, Optional, Sequence, Union

import torch


def make_dpo_trainer(model, tokenizer, train_records: List[dict], *, steps: int, batch_pairs: int, lr: float,
                     beta: float, loss_type: Union[str, Sequence[str]], seed: int, output_dir: str, use_dk: bool,
                     max_grad_norm: Optional[float] = 1.0, **config_overrides):
    """The `DPOTrainer` (TRL's, or ours when `use_dk`) set up as the module docstring says, not yet
    trained; it records each training step's loss in `trainer.step_losses`. `config_overrides` are
    `DPOConfig` fields that replace or add to those settings (e.g. `use_weighting=True`,
    `precompute_ref_log_probs=True`)."""
    import datasets
    from trl import DPOConfig

    if "forward" in vars(model):
        raise ValueError("model: its forward is already patched (e.g. by add_fused_lm_head); pass an unpatched model")
    if use_dk:
        from dpo_kernels.integrations.trl import DPOTrainer as base
    else:
        from trl import DPOTrainer as base

    class StepLossRecordingTrainer(base):
        """Keeps the loss of every training-mode `compute_loss` call."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
            if self.model.training:
                value = loss[0] if return_outputs else loss
                self.step_losses.append(float(value.detach()))
            return loss

    settings = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        optim="adamw_torch",
        learning_rate=lr,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=max_grad_norm or 0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=steps,
        per_device_train_batch_size=batch_pairs,
        gradient_accumulation_steps=1,
        train_sampling_strategy="sequential",
        dataloader_drop_last=False,
        dataloader_num_workers=0,
        max_length=None,
        precompute_ref_log_probs=False,
        disable_dropout=True,
        beta=beta,
        loss_type=[loss_type] if isinstance(loss_type, str) else list(loss_type),
        seed=seed,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        **_no_activation_checkpointing(DPOConfig),
    )
    args = DPOConfig(**{**settings, **config_overrides})
    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = StepLossRecordingTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_list(list(train_records)),
        processing_class=tokenizer,
    )
    trainer.step_losses = []
    return trainer


def _no_activation_checkpointing(config_class) -> dict:
    """DPOConfig turns activation (gradient) checkpointing on by default; transformers 5 renamed the
    field `activation_checkpointing`, keeping `gradient_checkpointing` as a deprecated alias."""
    names = {field.name for field in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def train_with_trl(model, tokenizer, train_records: List[dict], *, steps: int, batch_pairs: int, lr: float,
                   beta: float, loss_type: Union[str, Sequence[str]], seed: int, output_dir: str, use_dk: bool,
                   max_grad_norm: Optional[float] = 1.0) -> List[float]:
    """Runs `steps` optimiser steps of TRL 1.16's `DPOTrainer` (ours when `use_dk`) on `train_records`
    (TRL-format dicts: `prompt`/`chosen`/`rejected`, standard or conversational) and returns the
    per-step training losses. Settings: see the module docstring."""
    trainer = make_dpo_trainer(model, tokenizer, train_records, steps=steps, batch_pairs=batch_pairs, lr=lr,
                               beta=beta, loss_type=loss_type, seed=seed, output_dir=output_dir, use_dk=use_dk,
                               max_grad_norm=max_grad_norm)
    with torch.enable_grad():
        trainer.train()
    if len(trainer.step_losses) != steps:
        raise RuntimeError(f"expected {steps} recorded step losses, got {len(trainer.step_losses)}")
    return list(trainer.step_losses)
