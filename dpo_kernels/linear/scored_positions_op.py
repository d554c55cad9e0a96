"""`dpo_kernels::scored_positions`: the linear path's compaction index as a torch.library custom op.

`scored_positions(targets [S, T], ignore_index)` returns the int64 `[2, N]` contiguous (sequence
indices, position indices) of every target that is not ignore_index, in row-major order. N is known only from the
data, so the fake implementation gives it a fresh unbacked size: torch.compile traces the
compaction (the gather of `[N, H]` hidden states, the `[N]` kernels, the scatter back to `[S, T]`)
without reading N or guarding on it.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("dpo_kernels::scored_positions", mutates_args=())
def scored_positions(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (targets != ignore_index).nonzero().t().contiguous()


@scored_positions.register_fake
def _scored_positions_fake(targets, ignore_index):
    count = torch.library.get_ctx().new_dynamic_size()
    return targets.new_empty((targets.dim(), count), dtype=torch.int64)
