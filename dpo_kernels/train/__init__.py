"""A thin DPO trainer on top of `dk.fused_linear_dpo_loss`: data loading and collation, the training
loop, checkpoints, and the `dpo-kernels` command line. Needs the `train` extra (transformers)."""
