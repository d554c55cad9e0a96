"""Data parallelism of the trainer over `torch.distributed` (gloo on CPU, NCCL on GPU).

Every rank holds the whole model. Each global micro-batch of `batch_pairs * world_size` pairs is cut
into near-equal contiguous parts, one per rank; after the backward passes of an optimiser step the
gradients are summed across ranks (one all-reduce per parameter dtype, over a flat buffer), which
is what `DistributedDataParallel` does, done here explicitly because the trainer calls the model's
backbone and lm_head weight directly rather than the wrapped module's forward. Each rank weighs its
loss by its share of the step's pairs, so the summed gradient is the gradient of the mean loss over
the global batch: the same as one process with `batch_pairs * world_size` pairs.

Communicated per optimiser step: the parameters' gradients once (4 bytes per fp32 parameter) and
a few floats of metrics. Nothing is sent in a single process (world size 1).
"""

from __future__ import annotations

from typing import Dict, Iterable, List

import torch


class DataParallel:
    """The rank's view of the process group (world size 1 when torch.distributed is not initialised)."""

    def __init__(self):
        import torch.distributed as dist

        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_part(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global micro-batch (parts differ in size by at most 1; a
        part may be empty when the batch has fewer pairs than ranks)."""
        return torch.tensor_split(indices, self.world_size)[self.rank]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Start every rank from rank 0's parameters and buffers."""
        if not self.active:
            return
        import torch.distributed as dist
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum `.grad` across ranks in place (missing gradients count as zeros)."""
        if not self.active:
            return
        import torch.distributed as dist
        by_dtype: Dict[torch.dtype, List[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def sum_values(self, values: Dict[str, float], device) -> Dict[str, float]:
        """Sum a dict of floats across ranks (every rank passes the same keys)."""
        if not self.active:
            return dict(values)
        import torch.distributed as dist
        keys = sorted(values)
        packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        return dict(zip(keys, packed.tolist()))
