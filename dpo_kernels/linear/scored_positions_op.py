"""`dpo_kernels::scored_positions`: the linear path's compaction index as a torch.library custom op.

`scored_positions(targets [S, T], ignore_index, vocab_size)` returns the int64 `[2, N]` contiguous
(sequence indices, position indices) of every target that is not ignore_index, in row-major order,
after checking that each of them is in `[0, vocab_size)`: the caller's label check
(validation.check_label_range) is skipped while torch.compile traces, and the linear kernels take
any target (vocabulary-parallel ranks see other ranks' ids), so a bad label would otherwise give a
wrong number instead of an error in compiled code. N is known only from the
data, so the fake implementation gives it a fresh unbacked size: torch.compile traces the
compaction (the gather of `[N, H]` hidden states, the `[N]` kernels, the scatter back to `[S, T]`)
without reading N or guarding on it.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("dpo_kernels::scored_positions", mutates_args=())
def scored_positions(targets: torch.Tensor, ignore_index: int, vocab_size: int) -> torch.Tensor:
    scored = targets != ignore_index
    bad = scored & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"labels: the target {int(targets[index])} of position {list(index)} (after any shift) is "
                         f"outside [0, {vocab_size}) and is not ignore_index ({ignore_index})")
    return scored.nonzero().t().contiguous()


@scored_positions.register_fake
def _scored_positions_fake(targets, ignore_index, vocab_size):
    count = torch.library.get_ctx().new_dynamic_size()
    return targets.new_empty((targets.dim(), count), dtype=torch.int64)
