"""Which vocabulary ids this rank holds in a vocabulary-parallel call, agreed by every rank first.

In a vocabulary-parallel call each rank of `process_group` holds rows `[start, end)` of the full
lm_head weight (`[V_local, H]`, V_local = end - start) or the matching slice of the logits'
last dimension (`[..., V_local]`); together the ranks hold every id of `[0, V)` exactly once.

- `vocab_start`, `vocab_end` both None: an even split. Every rank must hold the same number
  V_local of rows; rank r holds `[r * V_local, (r + 1) * V_local)` (r = its rank in the group) and
  V = world_size * V_local.
- Both given (on every rank): any split, also uneven and in any rank order, as long as the ranges
  tile `[0, V)` without gap or overlap and `end - start == V_local` on each rank.

`resolve_vocab_shard` checks this with one all-gather of LAYOUT_INTS int64 per rank (its
range, its local size and a fingerprint of its labels, which must be the same on every rank): the
only collective before the kernels run. Every rank sees the same gathered table and raises the same
error, so a bad layout fails on all ranks instead of leaving some waiting in a later collective.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

# per rank: has an explicit range (0/1), start, end, local size, labels' element count, labels' fingerprint
LAYOUT_INTS = 6


class VocabShard(NamedTuple):
    """This rank's slice of the vocabulary: global ids `[start, end)` of `[0, vocab_size)`."""

    group: "dist.ProcessGroup"
    start: int
    end: int
    vocab_size: int  # V, the full vocabulary
    rank: int
    world_size: int

    @property
    def local_size(self) -> int:
        return self.end - self.start


def check_process_group(process_group) -> None:
    """process_group is a ProcessGroup of an initialised torch.distributed (raised before any work)."""
    if not dist.is_available():
        raise RuntimeError("process_group is given but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError("process_group is given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(...)), got {type(process_group).__name__}")


def _labels_fingerprint(labels: torch.Tensor) -> torch.Tensor:
    """An int64 that changes when any label changes (position-weighted sum, wrapping on overflow)."""
    flat = labels.reshape(-1).to(torch.int64)
    weights = torch.arange(1, 2 * flat.numel() + 1, 2, dtype=torch.int64, device=flat.device)
    return (flat * weights).sum()


def resolve_vocab_shard(process_group, vocab_start: Optional[int], vocab_end: Optional[int], local_size: int,
                        labels: torch.Tensor, *, holder: str) -> VocabShard:
    """The agreed layout (see the module docstring). One all-gather of LAYOUT_INTS int64 per rank, on
    `labels.device`. `holder` names what holds the local rows in error messages ("weight", "logits")."""
    group = process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    explicit = vocab_start is not None
    mine = torch.tensor([int(explicit), vocab_start if explicit else -1, vocab_end if explicit else -1, local_size,
                         labels.numel(), 0], dtype=torch.int64, device=labels.device)
    mine[5] = _labels_fingerprint(labels)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    rows = torch.stack(table).cpu().tolist()  # [world][LAYOUT_INTS], the same on every rank

    if len({r[0] for r in rows}) > 1:
        given = [i for i, r in enumerate(rows) if r[0]]
        raise ValueError(f"vocab_start/vocab_end are given on ranks {given} of process_group but not on the others: "
                         "give them on every rank (an explicit split) or on none (an even split)")
    if len({(r[4], r[5]) for r in rows}) > 1:
        raise ValueError("labels differ across the ranks of process_group: a vocabulary-parallel call needs the same "
                         "labels (and the same hidden states or logits rows) on every rank; each rank holds a slice "
                         "of the vocabulary, not of the batch")
    sizes = [r[3] for r in rows]
    if not explicit:
        if len(set(sizes)) > 1:
            raise ValueError(f"{holder} holds {sizes} vocabulary rows on ranks 0..{world - 1}: with vocab_start and "
                             f"vocab_end None (an even split) every rank must hold the same number; pass "
                             f"vocab_start/vocab_end on every rank for an uneven split")
        return VocabShard(group, rank * local_size, (rank + 1) * local_size, world * local_size, rank, world)

    for i, (_, start, end, size, _, _) in enumerate(rows):
        if end - start != size:
            raise ValueError(f"rank {i} of process_group has vocab_end - vocab_start = {end} - {start} = {end - start} "
                             f"but its {holder} holds {size} vocabulary rows: they must be equal")
    spans = sorted((r[1], r[2], i) for i, r in enumerate(rows))
    expected = 0
    for start, end, i in spans:
        if start != expected:
            raise ValueError(f"the ranks' [vocab_start, vocab_end) ranges must tile [0, V) without gap or overlap; "
                             f"got {[(r[1], r[2]) for r in rows]} (rank order): rank {i} starts at {start}, "
                             f"expected {expected}")
        expected = end
    return VocabShard(group, int(vocab_start), int(vocab_end), expected, rank, world)
