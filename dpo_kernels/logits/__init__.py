"""The logits path: per-sequence log-probs from logits a model already produced.

`sequence_logps` validates and reduces; `token_logps_op` holds the torch.library custom ops
that call a backend's fused log-softmax + gather kernel (backends/*_token_logps.py).
"""
