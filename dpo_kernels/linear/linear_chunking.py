"""How the linear path cuts the vocabulary into chunks, and what that costs in memory.

Notation: `N` valid (unmasked) tokens, `H` hidden size, `V` vocabulary size, `c` the chunk size,
`b` bytes per element of the compute dtype (4 fp32, 2 bf16/fp16, 8 float64), `a` bytes of the
accumulation dtype (4, or 8 for float64).

Peak extra memory of `dk.linear_sequence_logps` beyond its inputs (what `linear_peak_bytes`
returns; checked by python_tests/linear/test_linear_memory.py):

    forward : N*H*b [compacted hidden] + N*c*b [tile] + c*H*b [weight chunk, only when the weight
              is cast to the compute dtype] + k*N*a [running statistics, k = 3 + extras]
              + N*V*b when the tiles are cached (cache_budget_bytes >= N*V*b) instead of the tile
    backward: N*H*b [compacted hidden] + N*H*a [dhidden accumulator] + V*H*b_w + V*b_w [dweight,
              dbias: the gradients themselves] + the larger of
                - during the chunk loop: N*c*b [tile] (N*V*b, all tiles, when cached) + G, and
                - after it: S*T*H*b_h [dhidden scattered back to every position: the gradient itself]

G is the gradient GEMMs' workspace with a 16-bit compute dtype: c*H*4 [dweight chunk product in
fp32] on CUDA (`out_dtype`); on CPU, which has no fp32-output 16-bit GEMM, N*H*b [the chunk's
dhidden product, rounded once, then added to the accumulator], or, for an fp32 weight under
autocast, N*c*4 + N*H*4 + c*H*4 when larger [fp32 copies of the tile and the hidden states, and
the dweight chunk product].

So the peak is one tile plus `O(N * H)`, never `O(N * V)` unless the caller allows the cache.
"""

from __future__ import annotations

from typing import Optional

import torch

# Default tile budget (bytes of one [N, c] tile). CPU: small enough to stay near the caches and to
# keep the extra memory far below the logits'; CUDA: large enough for full-speed cuBLAS GEMMs.
DEFAULT_TILE_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}
MIN_CHUNK = 128  # a GEMM narrower than this wastes the hardware; also the rounding unit of c


def choose_chunk_size(num_tokens: int, vocab_size: int, element_size: int, device_type: str,
                      tile_bytes: Optional[int] = None) -> int:
    """Chunk size `c` from the tile budget: the largest multiple of MIN_CHUNK with
    `num_tokens * c * element_size <= tile_bytes` (at least MIN_CHUNK, at most V)."""
    budget = DEFAULT_TILE_BYTES.get(device_type, DEFAULT_TILE_BYTES["cuda"]) if tile_bytes is None else tile_bytes
    per_column = max(num_tokens, 1) * element_size
    chunk = (budget // per_column) // MIN_CHUNK * MIN_CHUNK
    return int(min(max(chunk, MIN_CHUNK), vocab_size))


def uses_cache(num_tokens: int, vocab_size: int, element_size: int, cache_budget_bytes: int) -> bool:
    """Whether forward keeps every tile for backward (then backward does no GEMM recompute)."""
    return num_tokens > 0 and num_tokens * vocab_size * element_size <= cache_budget_bytes


def linear_peak_bytes(
    *, num_tokens: int, positions: int, hidden_size: int, vocab_size: int, chunk_size: int,
    compute_dtype: torch.dtype, hidden_dtype: torch.dtype, weight_dtype: torch.dtype, has_bias: bool,
    num_stats: int, cached: bool, backward: bool, device_type: str = "cpu",
) -> int:
    """The peak extra bytes of the module docstring's formula (forward, or backward when
    `backward`). `positions` = S * T, `num_stats` = the per-token fp32 arrays forward keeps."""
    b = torch.empty((), dtype=compute_dtype).element_size()
    acc = 8 if compute_dtype == torch.float64 else 4
    N, H, V, c = num_tokens, hidden_size, vocab_size, chunk_size
    compacted = N * H * torch.empty((), dtype=hidden_dtype).element_size()
    if compute_dtype != hidden_dtype:
        compacted += N * H * b
    tile = N * V * b if cached else N * c * b
    if not backward:
        weight_chunk = c * H * b if weight_dtype != compute_dtype else 0
        return compacted + tile + weight_chunk + num_stats * N * acc
    w = torch.empty((), dtype=weight_dtype).element_size()
    h = torch.empty((), dtype=hidden_dtype).element_size()
    product = 0
    if compute_dtype not in (torch.float32, torch.float64):
        if device_type == "cuda":
            product = c * H * 4
        else:  # the chunk's dhidden product; fp32 operand copies for an fp32 weight's gradient (autocast)
            product = max(N * H * b, N * c * 4 + N * H * 4 + c * H * 4 if w == 4 else 0)
    gradients = N * H * acc + V * H * w + (V * w if has_bias else 0)
    return compacted + gradients + max(tile + product, positions * H * h)
