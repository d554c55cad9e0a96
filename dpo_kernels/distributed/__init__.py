"""Scaling out: the vocabulary-parallel combine and sharded lm_head weights (a leaf layer).

- `vocab_shard`: which vocabulary ids each rank holds (`VocabShard`, `resolve_vocab_shard`).
- `combine`: per-token statistics of the ranks' vocabulary slices merged with O(tokens) all-reduces.
- `vocab_parallel_logits`: the logits path's autograd function over a vocabulary slice.
- `sharded_weights`: FSDP2 / DTensor and DeepSpeed ZeRO-3 lm_head weights gathered for one call.

Users reach these through the `process_group`, `vocab_start`, `vocab_end` (and
`reduce_hidden_grad`) arguments of `dk.linear_sequence_logps`, `dk.sequence_logps`,
`dk.fused_linear_dpo_loss` and `dk.fused_dpo_loss`, and by passing FSDP2 / ZeRO-3 parameters as
`weight` / `bias` of the linear path.
"""

from .combine import forward_payload_rows
from .vocab_shard import LAYOUT_INTS, VocabShard

__all__ = ["LAYOUT_INTS", "VocabShard", "forward_payload_rows"]
