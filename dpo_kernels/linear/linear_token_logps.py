"""The linear path's chunk loops: per-token log-probs (and extras) of compacted tokens from hidden
states and the lm_head weight, chunk by chunk over the vocabulary, never building `[N, V]`.
`forward_chunks` and `backward_chunks` are plain functions on tensors; linear_token_logps_op.py
registers them as the custom ops `dpo_kernels::linear_token_logps` (and its backward), which is
what callers and torch.compile see.

Forward, per vocabulary chunk `[v0, v0 + c)`: one GEMM `tile = hidden @ weight[v0:v0+c].T (+ bias)`
into a reusable `[N, c]` buffer (or, in cached mode, into its `[N, c]` block of one `N * V` cache
that backward consumes) (cuBLAS on GPU, the CPU BLAS on CPU), then the backend's fused
epilogue folds the tile into per-token running statistics (see backends/tile_epilogue.py).
Backward, per chunk: the tile again (recomputed, or kept by forward under the cache budget), turned
into the gradient w.r.t. the GEMM output in place by the backend's epilogue, then
`dhidden += tile @ weight_chunk` into an fp32 accumulator, `dweight[v0:v0+c] = tile.T @ hidden`
(written once; no `[V, H]` fp32 buffer) and `dbias[v0:v0+c] = tile.sum(0)`. GEMMs accumulate in
fp32. With 16-bit operands the tile holds the logits' gradient rounded once to 16 bits (as the
plain 16-bit computation's does); `dweight` is rounded once to its dtype; the `dhidden` products
go into the fp32 accumulator unrounded on CUDA (`out_dtype=torch.float32`), and on the CPU, which
has no fp32-output 16-bit GEMM, each chunk's product is rounded once before it is added (the
16-bit GEMM runs at several times the fp32 rate there). Memory: see linear_chunking.py.

Vocabulary-parallel (`config.group` set): `weight` holds this rank's rows `[start, end)` of the
vocabulary and `targets` are global ids minus `start` (outside `[0, V_local)` where another rank
holds the target). Forward folds the slice as above, then distributed/combine.py merges the ranks'
statistics (two all-reduces of O(N) values) and every output is the whole vocabulary's. Backward
runs the same chunk loop with the combined (max, log-sum) and entropy, which gives this rank's
exact slice of the gradient w.r.t. the logits, so `dweight` / `dbias` are local and complete and
`dhidden` is this slice's share of the sum; with `config.reduce_hidden_grad` it is all-reduced
(summed over the group, in the fp32 accumulator, before the cast to hidden's dtype): the one
collective of backward, `N * H` accumulator values. Every rank must backpropagate the same
gradient into the (replicated) outputs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..backends.kernel_table import kernel_module
from ..backends.tile_epilogue import LogitTransform, TileStats
from ..distributed.combine import all_reduce_, combine_tile_stats
from ..outputs import EXTRAS  # noqa: F401  (re-exported: the order of the extras outputs)


class LinearConfig(NamedTuple):
    """One call's settings, resolved for its token count (linear_token_logps_op.py builds it)."""

    backend: str  # "cpu" | "triton" | "cuda" | "cuda_emulated"
    transform: LogitTransform
    chunk_size: int
    compute_dtype: torch.dtype
    extras: Tuple[str, ...]
    vocab_size: int  # the whole vocabulary's size (weight.shape[0] unless vocabulary-parallel)
    group: Optional["torch.distributed.ProcessGroup"] = None  # vocabulary-parallel (see the module docstring)
    reduce_hidden_grad: bool = False  # vocabulary-parallel: sum dhidden over group in backward


def _epilogues(backend: str):
    return kernel_module("tile_epilogues", backend)


def _acc_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _chunks(vocab_size: int, chunk_size: int):
    return [(v0, min(chunk_size, vocab_size - v0)) for v0 in range(0, vocab_size, chunk_size)]


def _cuda_out_dtype_mm() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype")


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in acc's dtype (fp32 or float64). 16-bit operands: on CUDA the product is
    accumulated in fp32 without rounding (`out_dtype`); on the CPU, which has no such kernel, the
    16-bit GEMM (fp32 accumulation inside) rounds this chunk's product once before it is added."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b.to(acc.dtype))
    elif a.device.type == "cuda" and _cuda_out_dtype_mm():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(a, b.to(a.dtype)))


def _write_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, accumulated in fp32 (float64) and rounded once to out's dtype."""
    if a.dtype == out.dtype:  # the GEMM accumulates in fp32 for 16-bit operands too
        torch.mm(a, b, out=out)
    elif a.dtype in (torch.float32, torch.float64):
        out.copy_(torch.mm(a, b))
    elif a.device.type == "cuda" and _cuda_out_dtype_mm():  # 16-bit operands, fp32 gradient (autocast)
        out.copy_(torch.mm(a, b, out_dtype=torch.float32))
    else:  # the same on the CPU, which has no fp32-output 16-bit GEMM: fp32 copies of the operands
        out.copy_(torch.mm(a.float(), b.float()))


def _tile_gemm(out: torch.Tensor, hidden: torch.Tensor, weight_chunk: torch.Tensor,
               bias_chunk: Optional[torch.Tensor]) -> None:
    if bias_chunk is None:
        torch.mm(hidden, weight_chunk.t(), out=out)
    else:
        torch.addmm(bias_chunk, hidden, weight_chunk.t(), out=out)


class _Chunk(NamedTuple):
    v0: int
    width: int
    weight: torch.Tensor  # [c, H] in the compute dtype
    bias: Optional[torch.Tensor]  # [c] in the compute dtype


def _weight_chunks(weight, bias, config: LinearConfig):
    """The chunks' weight (and bias) slices, cast to the compute dtype one chunk at a time."""
    cd = config.compute_dtype
    for v0, c in _chunks(weight.shape[0], config.chunk_size):
        w = weight[v0:v0 + c].to(cd)
        b = None if bias is None else bias[v0:v0 + c].to(cd)
        yield _Chunk(v0, c, w, b)


class ForwardResult(NamedTuple):
    """`[N]` per-token results in the accumulation dtype; None where not requested."""

    token_logps: torch.Tensor
    row_stats: torch.Tensor  # [N, 2]: (max, log-sum) of each row, what backward needs
    entropy: Optional[torch.Tensor]
    mean_logits: Optional[torch.Tensor]
    is_top1: Optional[torch.Tensor]  # bool
    log_sum_sq_probs: Optional[torch.Tensor]


def cache_tile(cache: torch.Tensor, rows: int, v0: int, width: int) -> torch.Tensor:
    """The `[rows, width]` tile of chunk `[v0, v0 + width)` in a cache of every tile (`rows * V`
    elements, the chunks one after another)."""
    return cache[rows * v0: rows * (v0 + width)].view(rows, width)


def forward_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   config: LinearConfig, cache: Optional[torch.Tensor] = None) -> ForwardResult:
    """(hidden `[N, H]`, weight `[V, H]`, bias `[V]` or None, targets int64 `[N]` in `[0, V)`
    (vocabulary-parallel: global ids minus this rank's start, any value)) -> the per-token results.
    With `cache` (`N * V` elements of the compute dtype) every tile is written there for backward;
    without, one `[N, c]` buffer is reused."""
    N, V = hidden.shape[0], weight.shape[0]
    cd, acc = config.compute_dtype, _acc_dtype(config.compute_dtype)
    device = hidden.device
    epi = _epilogues(config.backend)
    extras = set(config.extras)
    stats = TileStats.empty(N, acc, device, centered="entropy" in extras, sum_sq="log_sum_sq_probs" in extras,
                            sum_logits="mean_logits" in extras, top1="is_top1" in extras)
    h = hidden.to(cd)
    buffer = None if cache is not None else torch.empty(N * min(config.chunk_size, V), dtype=cd, device=device)
    with torch.autocast(device.type, enabled=False):
        for chunk in _weight_chunks(weight, bias, config):
            if cache is not None:
                tile = cache_tile(cache, N, chunk.v0, chunk.width)
            else:
                tile = buffer[: N * chunk.width].view(N, chunk.width)
            _tile_gemm(tile, h, chunk.weight, chunk.bias)
            epi.fold_tile(tile, chunk.v0, targets, stats, config.transform)
    del buffer
    if config.group is not None:
        stats = combine_tile_stats(stats, config.group)

    log_sum = stats.sum_exp.log()
    token_logps = (stats.target_logit - stats.max) - log_sum
    row_stats = torch.stack([stats.max, log_sum], dim=1)
    entropy = mean_logits = is_top1 = log_sum_sq_probs = None
    if stats.centered is not None:
        entropy = log_sum - stats.centered / stats.sum_exp
    if stats.sum_logits is not None:
        mean_logits = stats.sum_logits / config.vocab_size
    if stats.max_before_target is not None:
        is_top1 = (stats.target_logit > stats.max_before_target) & (stats.target_logit >= stats.max_after_target)
    if stats.sum_sq is not None:
        log_sum_sq_probs = stats.sum_sq.log() - 2 * log_sum
    return ForwardResult(token_logps, row_stats, entropy, mean_logits, is_top1, log_sum_sq_probs)


def backward_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                    row_stats: torch.Tensor, grad_logps: torch.Tensor, config: LinearConfig, *,
                    entropy_grad: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                    cache: Optional[torch.Tensor] = None, need_hidden: bool = True, need_weight: bool = True,
                    need_bias: bool = True) -> Tuple[Optional[torch.Tensor], ...]:
    """(dhidden `[N, H]` in hidden's dtype, dweight, dbias), each None unless needed, from the
    gradients of the token log-probs `grad_logps` `[N]` (and of the entropy, `entropy_grad`, with
    `entropy`), all contiguous in the accumulation dtype. `cache`: forward's tiles, overwritten here
    (with their gradients); None recomputes each tile into one reused buffer."""
    N, H = hidden.shape
    cd, acc = config.compute_dtype, _acc_dtype(config.compute_dtype)
    device = hidden.device
    epi = _epilogues(config.backend)
    h = hidden.to(cd)
    dhidden = torch.zeros((N, H), dtype=acc, device=device) if need_hidden else None
    dweight = torch.empty_like(weight) if need_weight else None
    dbias = torch.empty_like(bias) if need_bias and bias is not None else None
    buffer = None
    if cache is None:
        buffer = torch.empty(N * min(config.chunk_size, weight.shape[0]), dtype=cd, device=device)
    with torch.autocast(device.type, enabled=False):
        for chunk in _weight_chunks(weight, bias, config):
            v0, c = chunk.v0, chunk.width
            if cache is not None:
                tile = cache_tile(cache, N, v0, c)
            else:
                tile = buffer[: N * c].view(N, c)
                _tile_gemm(tile, h, chunk.weight, chunk.bias)
            epi.tile_logits_grad_(tile, v0, targets, row_stats, grad_logps, config.transform,
                                  entropy_grad=entropy_grad, entropy=entropy if entropy_grad is not None else None)
            if dhidden is not None:
                _accumulate_product(dhidden, tile, chunk.weight)
            if dweight is not None:
                _write_product(dweight[v0:v0 + c], tile.t(), h)
            if dbias is not None:
                dbias[v0:v0 + c] = tile.sum(dim=0, dtype=acc)
    if dhidden is not None and config.group is not None and config.reduce_hidden_grad:
        all_reduce_(dhidden, torch.distributed.ReduceOp.SUM, config.group)
    dhidden = None if dhidden is None else dhidden.to(hidden.dtype)
    return dhidden, dweight, dbias
