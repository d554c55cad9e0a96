"""The linear path: per-sequence log-probs from hidden states and the lm_head weight, without
ever building the `[N, V]` logits.

`linear_sequence_logps` validates, compacts the valid tokens (`scored_positions_op`) and reduces;
`linear_token_logps` holds the chunk loops over vocabulary tiles (a GEMM per tile, then a backend's
tile epilogue, backends/*_tile_epilogues.py), which `linear_token_logps_op` registers as custom ops
with their autograd formula; `linear_chunking` chooses the tile and holds the memory formula.
"""
