"""TRL 1.16's `DPOTrainer` with per-token log-probs from `dk.linear_sequence_logps`.

    from dpo_kernels.integrations.trl import DPOTrainer      # instead of trl.DPOTrainer
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(...), train_dataset=...,
                         processing_class=tokenizer)

How TRL 1.16 computes log-probs: `DPOTrainer.__init__` calls `trl.trainer.utils.add_fused_lm_head` on
the policy and the reference model. The patched forward (`fused_lm_head=True`) runs the backbone,
drops the last position, keeps the positions whose next-token label is not -100 (or, when
`trl.trainer.utils._use_triton(device)` is false, all positions with labels clamped to 0), and hands
`hidden [N, H]`, the lm_head weight and bias, `targets [N]`, the temperature, the softcap and
logit scale it resolved from the model config, and the requested outputs to
`trl.trainer.utils._ChunkedLogProbFunction.apply`. It scatters the returned per-token tensors back to
`[B, T - 1]`; `DPOTrainer._compute_loss` then does the masking, sums, losses and metrics.

What this module replaces, and nothing else: two globals of `trl.trainer.utils`, which in TRL 1.16
are read only by that fused forward:
- `_ChunkedLogProbFunction` -> a `LinearLogpsFunction`: the same `apply` arguments and the same five
  outputs (log-probs, entropy, `log sum p^2`, mean logit, is-top-1), computed by
  `dk.linear_sequence_logps` (forward and backward are ours; TRL's `chunk_size` is not used, ours
  comes from our tile budget unless `chunk_size` is given here).
- `_use_triton` -> always true, so TRL takes its own compacting branch on every device: only valid
  positions (`hidden[mask]`, `[N_valid, H]`) reach our kernel, and TRL scatters the results back with
  `masked_scatter`. TRL's default on CPU would project prompt and padding positions too; our kernel
  handles a varying `N_valid` on every backend, so nothing is lost by compacting.
Everything else stays TRL's: the backbone call, shifting, the logit-scale / softcap resolution from
the config, masking, reductions, losses, metrics, optimiser.

Scope: `DPOTrainer` swaps the two globals in only while its own `compute_loss` and
`compute_ref_log_probs` run (the forward passes that use the fused head); backward replays the
autograd graph recorded then, so it runs our kernel's backward too. Other TRL trainers in the same
process are untouched. `patch_trl()` / `unpatch_trl()` (or the `dk_log_probs()` context manager)
swap them in process-wide instead, for every trainer built on `add_fused_lm_head` (SFT, GRPO, RLOO,
KTO, DPO) - useful when the trainer is constructed by code you do not control (e.g. TRL's CLI). The
swap is a module global: not meant for trainers running concurrently in several threads.

Checked: `trl.__version__` must be 1.16.x and `trl.trainer.utils` must hold both names; otherwise
`DPOTrainer(...)` and `patch_trl()` raise `RuntimeError` before doing anything. Not supported: DeepSpeed
ZeRO-3 (TRL re-gathers the partitioned lm_head inside its own backward; ours cannot), refused with
`NotImplementedError` on the first forward.

Memory: as TRL's kernel, no `[N, V]` logits. TRL's compaction copies the valid hidden states once
(`[N_valid, H]`), and `dk.linear_sequence_logps` gathers its valid positions once more
(`[N_valid, H]`). When the LM head runs outside autocast with a weight dtype other than the hidden
states' (TRL's `cast_lm_head_to_fp32=True` on a 16-bit model; `DPOTrainer` never asks for it), the
weight (and bias) are cast to the hidden states' dtype first: one `[V, H]` copy.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch

import dpo_kernels as dk

from ..backends.availability import BACKEND_CHOICES

try:
    import trl
    from trl.kernels import chunked_logprob as _trl_chunked_logprob
    from trl.trainer import utils as _trl_utils
    from trl.trainer.dpo_trainer import DPOTrainer as _TRLDPOTrainer
except ImportError as error:  # trl missing, or a dependency of it
    raise ImportError(
        "dpo_kernels.integrations.trl needs TRL 1.16 (trl==1.16.0), which could not be imported "
        f"({error}). Install it with: pip install \"dpo-kernels[integration]\""
    ) from error

__all__ = [
    "DPOTrainer",
    "LinearLogpsFunction",
    "SUPPORTED_TRL_VERSION",
    "check_trl_version",
    "dk_log_probs",
    "is_trl_patched",
    "patch_trl",
    "unpatch_trl",
]

SUPPORTED_TRL_VERSION = "1.16"
# the globals of trl.trainer.utils that are swapped, and TRL's own values of them
_PATCHED_NAMES = ("_ChunkedLogProbFunction", "_use_triton")
_TRL_ORIGINALS = {
    "_ChunkedLogProbFunction": getattr(_trl_chunked_logprob, "ChunkedLogProbFunction", None),
    "_use_triton": getattr(_trl_chunked_logprob, "_use_triton", None),
}
# TRL's names for the per-token outputs, in the order its function returns them
_TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def check_trl_version() -> None:
    """RuntimeError unless the installed TRL is 1.16.x with the patch points this module replaces."""
    from packaging.version import InvalidVersion, Version

    installed = getattr(trl, "__version__", "unknown")
    try:
        release = Version(installed).release[:2]
    except InvalidVersion:
        release = None
    if release != (1, 16):
        raise RuntimeError(
            f"dpo_kernels.integrations.trl supports trl {SUPPORTED_TRL_VERSION}.x, found trl {installed}: it replaces "
            "trl.trainer.utils._ChunkedLogProbFunction, whose arguments and callers other versions may change. "
            "Install the tested version with: pip install \"dpo-kernels[integration]\""
        )
    missing = [name for name in _PATCHED_NAMES if _TRL_ORIGINALS[name] is None or not hasattr(_trl_utils, name)]
    if missing:
        raise RuntimeError(f"trl {installed} lacks {missing} in trl.trainer.utils (or trl.kernels.chunked_logprob), "
                           "which this adapter replaces")


def _compact_on_every_device(device: torch.device) -> bool:
    """Stands in for trl.trainer.utils._use_triton: TRL passes only the valid positions, on any device."""
    return True


def _check_kernel_options(backend, chunk_size, *, prefix: str = "") -> None:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"{prefix}backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"{prefix}chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"{prefix}chunk_size must be >= 1 or None, got {chunk_size}")


class LinearLogpsFunction:
    """Drop-in for TRL 1.16's `ChunkedLogProbFunction` where `trl.trainer.utils` calls it:
    `apply(hidden [N, H], weight [V, H], bias [V] or None, targets [N], temperature, chunk_size,
    final_logit_softcapping, logit_scale, outputs)` -> `(log_probs, entropy, log_sum_sq_probs,
    mean_logits, is_top1)`, each `[N]` or None when not in `outputs`, computed by
    `dk.linear_sequence_logps` (no `[N, V]` logits; gradients to hidden, weight and bias through
    log_probs and entropy, the other three detached as in TRL).

    `backend` and `chunk_size` go to `dk.linear_sequence_logps`; `chunk_size=None` lets it choose,
    TRL's own chunk size is ignored.
    """

    def __init__(self, *, backend: str = "auto", chunk_size: Optional[int] = None):
        _check_kernel_options(backend, chunk_size)
        self.backend = backend
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"LinearLogpsFunction(backend={self.backend!r}, chunk_size={self.chunk_size!r})"

    def apply(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: Optional[float] = None,
        logit_scale: float = 1.0,
        outputs: Tuple[str, ...] = ("log_probs",),
    ) -> Tuple[Optional[torch.Tensor], ...]:
        unknown = [name for name in outputs if name not in _TRL_OUTPUTS]
        if unknown:
            raise ValueError(f"outputs must be names from {_TRL_OUTPUTS}, got unknown {unknown}")
        if hasattr(weight, "ds_id"):
            raise NotImplementedError(
                "dpo_kernels.integrations.trl does not support DeepSpeed ZeRO-3: the lm_head weight is partitioned and "
                "our backward cannot gather it. Use ZeRO-1/2, FSDP, or TRL's own DPOTrainer."
            )
        if not torch.is_autocast_enabled(hidden.device.type):
            # TRL's kernel computes in the hidden states' dtype here, casting the weight chunk by chunk
            weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
            bias = bias if bias is None or bias.dtype == hidden.dtype else bias.to(hidden.dtype)
        extras = tuple(name for name in _TRL_OUTPUTS[1:] if name in outputs)
        result = dk.linear_sequence_logps(
            hidden, weight, targets, bias,
            temperature=float(temperature),
            logit_scale=float(logit_scale),
            softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
            extras=extras,
            return_token_logps=True,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        log_sum_sq_probs = None if result.log_sum_sq_probs is None else result.log_sum_sq_probs.detach()
        mean_logits = None if result.mean_logits is None else result.mean_logits.detach()
        return result.token_logps, result.entropy, log_sum_sq_probs, mean_logits, result.is_top1


@contextlib.contextmanager
def dk_log_probs(*, backend: str = "auto", chunk_size: Optional[int] = None) -> Iterator[LinearLogpsFunction]:
    """Within the block, every TRL fused LM head (`add_fused_lm_head`) computes its per-token outputs
    with `dk.linear_sequence_logps`; on exit the previous values (TRL's, or an outer patch) return."""
    check_trl_version()
    function = LinearLogpsFunction(backend=backend, chunk_size=chunk_size)
    with _swapped_in(function):
        yield function


@contextlib.contextmanager
def _swapped_in(function: LinearLogpsFunction) -> Iterator[LinearLogpsFunction]:
    saved = {name: getattr(_trl_utils, name) for name in _PATCHED_NAMES}
    _trl_utils._ChunkedLogProbFunction = function
    _trl_utils._use_triton = _compact_on_every_device
    try:
        yield function
    finally:
        for name, value in saved.items():
            setattr(_trl_utils, name, value)


def patch_trl(*, backend: str = "auto", chunk_size: Optional[int] = None) -> LinearLogpsFunction:
    """Process-wide: every TRL trainer's fused LM head uses `dk.linear_sequence_logps` from now on
    (models already patched by `add_fused_lm_head` included: the globals are read on each call).
    Calling it again replaces the options. Returns the installed function."""
    check_trl_version()
    function = LinearLogpsFunction(backend=backend, chunk_size=chunk_size)
    _trl_utils._ChunkedLogProbFunction = function
    _trl_utils._use_triton = _compact_on_every_device
    return function


def unpatch_trl() -> None:
    """Restores TRL's own `_ChunkedLogProbFunction` and `_use_triton` in `trl.trainer.utils`."""
    for name, value in _TRL_ORIGINALS.items():
        if value is not None:
            setattr(_trl_utils, name, value)


def is_trl_patched() -> bool:
    """Whether TRL's fused LM head currently runs `dk.linear_sequence_logps`."""
    return isinstance(getattr(_trl_utils, "_ChunkedLogProbFunction", None), LinearLogpsFunction)


class DPOTrainer(_TRLDPOTrainer):
    """`trl.DPOTrainer` (1.16) whose policy and reference per-token log-probs, entropy, mean logits
    and top-1 flags come from `dk.linear_sequence_logps`, forward and backward. Same arguments as
    TRL's, plus `dk_backend` and `dk_chunk_size` for the kernel; losses and metrics are TRL's code.
    """

    def __init__(self, *args, dk_backend: str = "auto", dk_chunk_size: Optional[int] = None, **kwargs):
        check_trl_version()
        _check_kernel_options(dk_backend, dk_chunk_size, prefix="dk_")
        # set before TRL's __init__, which may already precompute reference log-probs
        self.dk_function = LinearLogpsFunction(backend=dk_backend, chunk_size=dk_chunk_size)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with _swapped_in(self.dk_function):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        with _swapped_in(self.dk_function):
            return super().compute_ref_log_probs(model, inputs)
