"""Argument checks run before any kernel launches. Messages name the argument and what was expected."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backends.availability import BACKEND_CHOICES
from .outputs import EXTRAS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 exists for tight gradient checks; only the CPU kernel and the reference take it.
FLOAT64_BACKENDS = ("cpu", "reference")


def check_tensor(name: str, value, *, dims: Sequence[int]) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")


def check_vocab_size(name: str, value: torch.Tensor) -> None:
    if value.shape[-1] == 0:
        raise ValueError(f"{name} must have a vocabulary (last) dimension of size >= 1, got shape {tuple(value.shape)}")


def check_float_dtype(name: str, value: torch.Tensor, backend: str) -> None:
    if value.dtype in FLOAT_DTYPES:
        return
    if value.dtype == torch.float64:
        if backend in FLOAT64_BACKENDS:
            return
        raise TypeError(
            f"{name} dtype float64 is supported by backend='cpu' and backend='reference' only, "
            f"not by backend={backend!r}"
        )
    raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64 on CPU), got {value.dtype}")


def check_unit_stride(name: str, value: torch.Tensor) -> None:
    if value.shape[-1] > 1 and value.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride over its last dimension (got strides {tuple(value.stride())}); "
            f"the kernels read rows in place and never copy them: pass {name}.contiguous() if you accept the copy"
        )


def check_same_device(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def check_labels(labels, expected_shape: torch.Size, shape_source: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != expected_shape:
        raise ValueError(f"labels must have shape {tuple(expected_shape)} ({shape_source}), got {tuple(labels.shape)}")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label is in [0, vocab_size) or equals ignore_index. Reads the labels (a device sync on
    GPU); skipped while torch.compile traces, where the kernels turn a bad label into NaN instead."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels{list(index)} = {int(labels[index])} is outside [0, {vocab_size}) "
            f"and is not ignore_index ({ignore_index})"
        )


def check_token_weights(token_weights: Optional[torch.Tensor], labels: torch.Tensor) -> None:
    if token_weights is None:
        return
    if not isinstance(token_weights, torch.Tensor):
        raise TypeError(f"token_weights must be a torch.Tensor or None, got {type(token_weights).__name__}")
    if not token_weights.dtype.is_floating_point:
        raise TypeError(f"token_weights must be a floating-point tensor, got {token_weights.dtype}")
    if token_weights.shape != labels.shape:
        raise ValueError(
            f"token_weights must have the shape of labels {tuple(labels.shape)}, got {tuple(token_weights.shape)}"
        )
    check_same_device("token_weights", token_weights, "labels", labels)


def check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_extras(extras) -> tuple:
    """`extras` is a sequence (or set) of names from EXTRAS; returns them in EXTRAS order."""
    if isinstance(extras, str) or not isinstance(extras, (Sequence, set, frozenset)):
        raise TypeError(f"extras must be a sequence of names from {EXTRAS}, got {extras!r}")
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"extras must be names from {EXTRAS}, got unknown {unknown}")
    return tuple(e for e in EXTRAS if e in extras)


def check_backend_name(backend) -> None:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def check_vocab_parallel(process_group, vocab_start, vocab_end, backend: str) -> None:
    """The vocabulary-parallel arguments, locally (the layout across ranks is checked by
    distributed.vocab_shard.resolve_vocab_shard, collectively)."""
    if process_group is None:
        for name, value in (("vocab_start", vocab_start), ("vocab_end", vocab_end)):
            if value is not None:
                raise ValueError(f"{name} is given without process_group: a vocabulary range only means something "
                                 "for a vocabulary-parallel call (pass process_group too)")
        return
    from .distributed.vocab_shard import check_process_group  # noqa: PLC0415 (only for distributed calls)

    check_process_group(process_group)
    if (vocab_start is None) != (vocab_end is None):
        raise ValueError("give both vocab_start and vocab_end (an explicit split) or neither (an even split), got "
                         f"vocab_start={vocab_start!r}, vocab_end={vocab_end!r}")
    if vocab_start is not None:
        check_int("vocab_start", vocab_start)
        check_int("vocab_end", vocab_end)
        if not 0 <= vocab_start < vocab_end:
            raise ValueError(f"vocab_start and vocab_end must satisfy 0 <= vocab_start < vocab_end, got "
                             f"[{vocab_start}, {vocab_end})")
    if backend == "reference":
        raise ValueError("backend='reference' has no vocabulary-parallel form (it builds the full logits): with "
                         "process_group use backend='auto', 'cpu', 'triton' or 'cuda'")
