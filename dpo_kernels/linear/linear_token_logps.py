"""The linear path's autograd function: per-token log-probs (and extras) of compacted tokens from
hidden states and the lm_head weight, chunk by chunk over the vocabulary, never building `[N, V]`.

Forward, per vocabulary chunk `[v0, v0 + c)`: one GEMM `tile = hidden @ weight[v0:v0+c].T (+ bias)`
into a reusable `[N, c]` buffer (cuBLAS on GPU, the CPU BLAS on CPU), then the backend's fused
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

Vocabulary-parallel (`config.shard` set): `weight` holds this rank's rows `[start, end)` of the
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

from typing import List, NamedTuple, Optional, Tuple

import torch

from ..backends.kernel_table import kernel_module
from ..backends.tile_epilogue import LogitTransform, TileStats
from ..distributed.combine import all_reduce_, combine_tile_stats
from ..distributed.vocab_shard import VocabShard

EXTRAS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


class LinearConfig(NamedTuple):
    backend: str  # "cpu" | "triton" | "cuda" | "cuda_emulated"
    transform: LogitTransform
    chunk_size: int
    compute_dtype: torch.dtype
    extras: Tuple[str, ...]
    cache: bool  # keep every tile for backward
    shard: Optional[VocabShard] = None  # vocabulary-parallel: this rank's slice (see the module docstring)
    reduce_hidden_grad: bool = False  # vocabulary-parallel: sum dhidden over shard.group in backward


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


class LinearTokenLogps(torch.autograd.Function):
    """(hidden `[N, H]`, weight `[V, H]`, bias `[V]` or None, targets int64 `[N]` in `[0, V)`
    (vocabulary-parallel: global ids minus shard.start, any value), config) -> (token_logps `[N]`,
    entropy `[N]` or None, mean_logits, is_top1, log_sum_sq_probs), in the accumulation dtype
    (is_top1 bool). Differentiable: token_logps and entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, config: LinearConfig):
        # entropy is often returned for logging only: with no gradient flowing into it, backward
        # gets None (not a zeros tensor) and skips the entropy term
        ctx.set_materialize_grads(False)
        N, V = hidden.shape[0], weight.shape[0]
        cd, acc = config.compute_dtype, _acc_dtype(config.compute_dtype)
        device = hidden.device
        epi = _epilogues(config.backend)
        extras = set(config.extras)
        stats = TileStats.empty(N, acc, device, centered="entropy" in extras, sum_sq="log_sum_sq_probs" in extras,
                                sum_logits="mean_logits" in extras, top1="is_top1" in extras)
        h = hidden.to(cd)
        cached: List[torch.Tensor] = []
        buffer = None if config.cache else torch.empty(N * min(config.chunk_size, V), dtype=cd, device=device)
        with torch.autocast(device.type, enabled=False):
            for chunk in _weight_chunks(weight, bias, config):
                if config.cache:
                    tile = torch.empty((N, chunk.width), dtype=cd, device=device)
                    cached.append(tile)
                else:
                    tile = buffer[: N * chunk.width].view(N, chunk.width)
                _tile_gemm(tile, h, chunk.weight, chunk.bias)
                epi.fold_tile(tile, chunk.v0, targets, stats, config.transform)
        del buffer
        if config.shard is not None:
            stats = combine_tile_stats(stats, config.shard.group)

        log_sum = stats.sum_exp.log()
        token_logps = (stats.target_logit - stats.max) - log_sum
        row_stats = torch.stack([stats.max, log_sum], dim=1)
        entropy = mean_logits = is_top1 = log_sum_sq_probs = None
        if stats.centered is not None:
            entropy = log_sum - stats.centered / stats.sum_exp
        if stats.sum_logits is not None:
            mean_logits = stats.sum_logits / (V if config.shard is None else config.shard.vocab_size)
        if stats.max_before_target is not None:
            is_top1 = (stats.target_logit > stats.max_before_target) & (stats.target_logit >= stats.max_after_target)
        if stats.sum_sq is not None:
            log_sum_sq_probs = stats.sum_sq.log() - 2 * log_sum

        ctx.config = config
        ctx.cached = cached if config.cache else None
        ctx.has_entropy = entropy is not None
        ctx.save_for_backward(hidden, weight, bias, targets, row_stats, entropy)
        for t in (mean_logits, is_top1, log_sum_sq_probs):
            if t is not None:
                ctx.mark_non_differentiable(t)
        return token_logps, entropy, mean_logits, is_top1, log_sum_sq_probs

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_unused):
        hidden, weight, bias, targets, row_stats, entropy = ctx.saved_tensors
        config: LinearConfig = ctx.config
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_hidden or need_weight or need_bias):
            return None, None, None, None, None
        N, H = hidden.shape
        cd, acc = config.compute_dtype, _acc_dtype(config.compute_dtype)
        device = hidden.device
        epi = _epilogues(config.backend)
        g = torch.zeros(N, dtype=acc, device=device) if grad_logps is None else grad_logps.to(acc).contiguous()
        ge = None
        if ctx.has_entropy and grad_entropy is not None:
            ge = grad_entropy.to(acc).contiguous()
        cached, ctx.cached = ctx.cached, None  # a second backward (retain_graph) recomputes

        h = hidden.to(cd)
        dhidden = torch.zeros((N, H), dtype=acc, device=device) if need_hidden else None
        dweight = torch.empty_like(weight) if need_weight else None
        dbias = torch.empty_like(bias) if need_bias else None
        buffer = None
        if cached is None:
            buffer = torch.empty(N * min(config.chunk_size, weight.shape[0]), dtype=cd, device=device)
        with torch.autocast(device.type, enabled=False):
            for index, chunk in enumerate(_weight_chunks(weight, bias, config)):
                v0, c = chunk.v0, chunk.width
                if cached is not None:
                    tile, cached[index] = cached[index], None  # freed as soon as it is used
                else:
                    tile = buffer[: N * c].view(N, c)
                    _tile_gemm(tile, h, chunk.weight, chunk.bias)
                epi.tile_logits_grad_(tile, v0, targets, row_stats, g, config.transform, entropy_grad=ge,
                                      entropy=entropy if ge is not None else None)
                if need_hidden:
                    _accumulate_product(dhidden, tile, chunk.weight)
                if need_weight:
                    _write_product(dweight[v0:v0 + c], tile.t(), h)
                if need_bias:
                    dbias[v0:v0 + c] = tile.sum(dim=0, dtype=acc)
        if dhidden is not None and config.shard is not None and config.reduce_hidden_grad:
            all_reduce_(dhidden, torch.distributed.ReduceOp.SUM, config.shard.group)
        dhidden = None if dhidden is None else dhidden.to(hidden.dtype)
        return dhidden, dweight, dbias, None, None
