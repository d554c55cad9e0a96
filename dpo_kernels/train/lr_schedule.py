"""Learning-rate schedules: linear warmup, then constant, linear decay to 0, or cosine decay to 0
(the same factors as Hugging Face's `get_*_schedule_with_warmup`)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, *, warmup_steps: int, total_steps: int, schedule: str):
    """A `LambdaLR` over `lr_factor`; its state dict holds only numbers (the lambda is not saved)."""
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def recompute_learning_rate(scheduler) -> None:
    """Set the optimizer's learning rates to the schedule's value at the scheduler's current step.
    After a checkpoint's scheduler state is loaded into a scheduler built for another number of
    total steps (an extended run), the next step then follows the new schedule; with the same total
    the rates are the ones the checkpoint holds, bit for bit."""
    scheduler.last_epoch -= 1
    scheduler.step()
