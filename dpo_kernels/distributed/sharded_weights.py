"""The lm_head weight (and bias) of a sharding data-parallel wrapper, materialised for one call of
the linear path: FSDP2 / DTensor and DeepSpeed ZeRO-3.

- **FSDP2 / DTensor.** Outside its owning module's forward, FSDP2 (`fully_shard`) leaves a
  parameter as a `DTensor` sharded by rows (`Shard(0)`). `gather_dtensors` all-gathers it with
  `full_tensor()`, differentiably, into a plain `[V, H]` tensor that the call keeps (saved for
  backward) until its backward is done; nothing else is gathered. Its gradient goes back through
  the DTensor's autograd as `Partial("avg")` on every mesh dimension: a reduce-scatter averaging
  the ranks' gradients (an all-reduce-average over replicated dimensions, as in HSDP), which is
  what FSDP2 itself does for the parameters of a module whose forward it wraps, so `param.grad`
  is the `Shard(0)` DTensor of the mean gradient, as the optimizer expects. (With identical
  gradients on every rank, as under tensor parallelism with a replicated loss, the mean is the
  gradient itself.) Per call: one all-gather of V*H (+ V) elements of the parameter's dtype in
  forward and one reduce-scatter of as many in backward. FSDP2's no-sync mode
  (`set_requires_gradient_sync(False)`) and custom gradient divide factors do not reach this
  reduction: it averages on every backward.
- **DeepSpeed ZeRO-3.** A partitioned parameter (it has `ds_id` and `ds_status`, and its status is
  not AVAILABLE) holds no data outside its module's forward. `zero3_gathered` gathers it with
  `deepspeed.zero.GatheredParameters` (read-only) for the call. That serves calls that want no
  gradient for it (a frozen reference head, evaluation, `torch.no_grad()`): its data is partitioned
  again when the call returns, so a backward could neither recompute the tiles from it nor
  accumulate a `[V, H]` gradient into it. For training, call the linear path inside the lm_head
  module's forward (e.g. a forward redirection as TRL does for fused losses): ZeRO-3's module hooks
  then gather the parameter for forward and backward and reduce its gradient, the parameter is
  AVAILABLE here and nothing is gathered. A partitioned parameter that would receive a gradient is
  refused (`check_no_zero3_gradient`). deepspeed is imported only when such a parameter is seen.
  UNTESTED against DeepSpeed itself (it is not installed where this was written; the tests use a
  stand-in module with the same interface).

The checks cost nothing on the single-process path: a tensor can only be a DTensor once
`torch.distributed.tensor` has been imported, and the ZeRO-3 test is an attribute lookup.
"""

from __future__ import annotations

import contextlib
import sys
from typing import ContextManager, Optional, Tuple

import torch


def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_dtensor(t: Optional[torch.Tensor]) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def is_zero3_param(t: Optional[torch.Tensor]) -> bool:
    return t is not None and hasattr(t, "ds_id") and hasattr(t, "ds_status")


def gather_dtensors(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`weight` and `bias` as plain full tensors: each DTensor among them all-gathered with
    `full_tensor()` (differentiable; gradients averaged back into its layout, see the module
    docstring); plain tensors are returned as they are."""
    if _dtensor_class() is None:
        return weight, bias
    return _full(weight), _full(bias)


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial  # noqa: PLC0415 (loaded: t is a DTensor)

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def _zero3_unavailable(params) -> list:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: PLC0415

    unique = {id(p): p for p in params if is_zero3_param(p)}  # the same parameter twice breaks the gather
    return [p for p in unique.values() if p.ds_status != ZeroParamStatus.AVAILABLE]


def needs_zero3_gather(*params: Optional[torch.Tensor]) -> bool:
    """Whether some of `params` is a ZeRO-3 parameter that is partitioned right now."""
    return any(is_zero3_param(p) for p in params) and bool(_zero3_unavailable(params))


def zero3_gathered(*params: Optional[torch.Tensor]) -> ContextManager:
    """`deepspeed.zero.GatheredParameters` over those of `params` that are partitioned (read-only:
    no rank modifies them), or a null context when there are none."""
    missing = _zero3_unavailable(params) if any(is_zero3_param(p) for p in params) else []
    if not missing:
        return contextlib.nullcontext()
    import deepspeed  # noqa: PLC0415

    return deepspeed.zero.GatheredParameters(missing, modifier_rank=None)


def check_no_zero3_gradient(*params: Optional[torch.Tensor]) -> None:
    """Raises when a partitioned ZeRO-3 parameter among `params` would receive a gradient."""
    wanting = [p for p in _zero3_unavailable(params) if p.requires_grad and torch.is_grad_enabled()]
    if wanting:
        raise ValueError(
            "weight / bias is a partitioned DeepSpeed ZeRO-3 parameter that requires grad: gathering it for this "
            "call cannot give it a gradient (ZeRO-3 partitions it again before backward). Call the linear path inside "
            "the lm_head module's forward (ZeRO-3 then gathers it and reduces its gradient), or under torch.no_grad() "
            "for a frozen head"
        )
