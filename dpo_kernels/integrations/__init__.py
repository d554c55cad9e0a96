"""Adapters that put dpo_kernels inside other training libraries.

- `dpo_kernels.integrations.trl`: TRL 1.16's `DPOTrainer` (and, through `patch_trl()`, every TRL
  trainer built on its fused LM head) computing per-token log-probs with `dk.linear_sequence_logps`.
  Needs the `integration` extra: `pip install "dpo-kernels[integration]"`.

Importing this package imports no training library; each adapter module imports its own.
"""
