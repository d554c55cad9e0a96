"""`TrainConfig`: every setting of a training run, validated once, saved with each checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from numbers import Real
from typing import Optional, Tuple, Union

from ..losses.dpo_from_logps import check_fused_options
from ..losses.eager_linear_dpo_loss import check_eager_backward

SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISION = ("auto", "bf16", "no")


@dataclass
class TrainConfig:
    """Settings of `DPOTrainer`. Optimisation follows Hugging Face's Trainer defaults (AdamW, betas
    (0.9, 0.999), eps 1e-8, no weight decay, gradient norm clipped to 1.0), so that a run can be
    compared with TRL's `DPOTrainer` step by step."""

    output_dir: str = "dpo_output"
    # loss: the keyword options of `dk.fused_linear_dpo_loss` (beta, loss_type, loss_weights,
    # label_smoothing, f_divergence_type, ..., ld_alpha, use_weighting)
    loss_options: dict = field(default_factory=lambda: {"beta": 0.1, "loss_type": "sigmoid"})
    # reference: a frozen copy of the policy at step 0 (or the `ref_model` given), scored live or
    # once up front and cached on disk under `<cache_dir>/` (default `<output_dir>/ref_logps`)
    precompute_ref_logps: bool = False
    ref_cache_dir: Optional[str] = None
    # optimisation
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    # batching: an optimiser step sees batch_pairs * grad_accumulation pairs
    batch_pairs: int = 8
    grad_accumulation: int = 1
    epochs: float = 1.0
    max_steps: Optional[int] = None
    shuffle: bool = True
    seed: int = 0
    # numerics and memory
    mixed_precision: str = "auto"      # auto: bf16 autocast on CUDA, none on CPU
    gradient_checkpointing: bool = False
    disable_dropout: bool = True       # dropout and router noise off (model_quirks.py): policy == reference at step 0
    router_aux_loss: bool = True       # MoE: add router_aux_loss_coef x the model's aux_loss, as TRL does
    fsdp2: bool = False                # under torchrun: shard the policy with FSDP2 instead of replicating it
    chunk_size: Optional[int] = None   # vocabulary chunk of the linear path (None: its default)
    eager_backward: bool = False       # gradients in forward, pair by pair (no recompute; see docs/losses.md)
    backend: str = "auto"
    # bookkeeping
    log_every: int = 1
    eval_every: Optional[int] = None   # None: at the start and at the end only
    eval_batch_pairs: Optional[int] = None
    save_every: Optional[int] = None   # None: a checkpoint at the end only
    keep_checkpoints: int = 2
    progress_bar: bool = True
    plots: bool = True

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        """ValueError/TypeError naming the setting at fault."""
        check_fused_options(self.loss_options, "TrainConfig.loss_options")
        if not isinstance(self.eager_backward, bool):
            raise TypeError(f"eager_backward must be a bool, got {type(self.eager_backward).__name__}")
        if self.eager_backward:
            check_eager_backward(self.loss_options)
        if "pair_weights" in self.loss_options:
            raise ValueError("TrainConfig.loss_options: pair_weights is per batch; the trainer cannot take it")
        _positive("learning_rate", self.learning_rate, allow_zero=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("adam_eps", self.adam_eps)
        if len(self.adam_betas) != 2 or not all(isinstance(b, Real) and 0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        for name in ("warmup_steps",):
            _integer(name, getattr(self, name), minimum=0)
        for name in ("batch_pairs", "grad_accumulation", "log_every", "keep_checkpoints"):
            _integer(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "eval_every", "save_every", "eval_batch_pairs", "chunk_size"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), minimum=1)
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        _positive("epochs", self.epochs)
        _integer("seed", self.seed, minimum=0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown setting(s) {unknown}")
        return cls(**values)


def _positive(name: str, value: Union[int, float], *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _integer(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
