"""The linear path's chunk loops as torch.library custom ops, so that torch.compile traces the
path without graph breaks (the loops stay opaque: Python over vocabulary chunks, a GEMM and a
backend epilogue each).

    dpo_kernels::linear_token_logps(hidden [N, H], weight [V, H], bias [V]?, targets [N], ...)
        -> (token_logps [N], row_stats [N, 2], entropy, mean_logits, is_top1, log_sum_sq_probs, cache)
    dpo_kernels::linear_token_logps_backward(..., cache!) -> (dhidden [N, H], dweight [V, H], dbias [V])

An extra that was not requested, a gradient that is not needed and the cache when not used are
empty (`[0]`) tensors: an op returns tensors only. The chunk size and the cache decision depend on
N, which is data-dependent under torch.compile (the count of scored positions), so both are made
inside the ops, from the caller's `chunk_size` (0: from the tile budget) and `cache_budget_bytes`;
the fakes give the cache a fresh unbacked size. The backward op overwrites the cache with the
tiles' gradients (`mutates_args`); autograd hands it to the first backward only, a second one
(retain_graph) recomputes. Vocabulary parallelism passes the process group by name.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..backends.tile_epilogue import LogitTransform
from . import linear_token_logps as loops
from .linear_chunking import choose_chunk_size, uses_cache


class LinearOptions(NamedTuple):
    """The ops' non-tensor arguments, as the caller gives them (before N is known)."""

    backend: str  # "cpu" | "triton" | "cuda"
    pre_scale: float
    softcap: float  # 0: off
    post_scale: float
    chunk_size: int  # 0: from the tile budget
    cache_budget_bytes: int
    compute_dtype: torch.dtype
    extras: str  # comma-separated names from linear_token_logps.EXTRAS, in that order
    vocab_size: int  # the whole vocabulary (weight.shape[0] unless vocabulary-parallel)
    group_name: Optional[str] = None  # vocabulary-parallel: the process group's name
    reduce_hidden_grad: bool = False


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _config(options: LinearOptions, hidden: torch.Tensor, weight: torch.Tensor) -> loops.LinearConfig:
    """The loops' settings for this call's N (= hidden.shape[0])."""
    local_vocab = weight.shape[0]
    chunk = options.chunk_size or choose_chunk_size(hidden.shape[0], local_vocab, _element_size(options.compute_dtype),
                                                    hidden.device.type)
    group = None
    if options.group_name is not None:
        from torch.distributed.distributed_c10d import _resolve_process_group  # noqa: PLC0415 (distributed only)

        group = _resolve_process_group(options.group_name)
    return loops.LinearConfig(
        backend=options.backend,
        transform=LogitTransform(pre_scale=options.pre_scale, softcap=options.softcap, post_scale=options.post_scale),
        chunk_size=min(chunk, local_vocab), compute_dtype=options.compute_dtype,
        extras=tuple(e for e in options.extras.split(",") if e), vocab_size=options.vocab_size, group=group,
        reduce_hidden_grad=options.reduce_hidden_grad,
    )


def _cache_elements(options: LinearOptions, hidden: torch.Tensor, weight: torch.Tensor) -> int:
    N, V = hidden.shape[0], weight.shape[0]
    return N * V if uses_cache(N, V, _element_size(options.compute_dtype), options.cache_budget_bytes) else 0


def _empty(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


@torch.library.custom_op("dpo_kernels::linear_token_logps", mutates_args=())
def linear_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, backend: str,
    pre_scale: float, softcap: float, post_scale: float, chunk_size: int, cache_budget_bytes: int,
    compute_dtype: torch.dtype, extras: str, vocab_size: int, group_name: Optional[str], reduce_hidden_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = LinearOptions(backend, pre_scale, softcap, post_scale, chunk_size, cache_budget_bytes, compute_dtype,
                            extras, vocab_size, group_name, reduce_hidden_grad)
    cache_elements = _cache_elements(options, hidden, weight)
    cache = hidden.new_empty((cache_elements,), dtype=compute_dtype)
    result = loops.forward_chunks(hidden, weight, bias, targets, _config(options, hidden, weight),
                                  cache if cache_elements else None)
    acc = result.token_logps
    return (result.token_logps, result.row_stats,
            *(_empty(acc, torch.bool if name == "is_top1" else None) if value is None else value
              for name, value in zip(loops.EXTRAS, result[2:])),
            cache)


@linear_token_logps.register_fake
def _linear_token_logps_fake(hidden, weight, bias, targets, backend, pre_scale, softcap, post_scale, chunk_size,
                             cache_budget_bytes, compute_dtype, extras, vocab_size, group_name, reduce_hidden_grad):
    N = hidden.shape[0]
    acc = loops._acc_dtype(compute_dtype)
    wanted = extras.split(",")
    per_token = [hidden.new_empty((N if name in wanted else 0,), dtype=torch.bool if name == "is_top1" else acc)
                 for name in loops.EXTRAS]
    # N * V or 0, decided from N at run time: a size of its own
    cache = hidden.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=compute_dtype)
    return (hidden.new_empty((N,), dtype=acc), hidden.new_empty((N, 2), dtype=acc), *per_token, cache)


@torch.library.custom_op("dpo_kernels::linear_token_logps_backward", mutates_args=("cache",))
def linear_token_logps_backward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    row_stats: torch.Tensor, grad_logps: torch.Tensor, entropy: Optional[torch.Tensor],
    entropy_grad: Optional[torch.Tensor], cache: torch.Tensor, need_hidden: bool, need_weight: bool, need_bias: bool,
    backend: str, pre_scale: float, softcap: float, post_scale: float, chunk_size: int, cache_budget_bytes: int,
    compute_dtype: torch.dtype, extras: str, vocab_size: int, group_name: Optional[str], reduce_hidden_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = LinearOptions(backend, pre_scale, softcap, post_scale, chunk_size, cache_budget_bytes, compute_dtype,
                            extras, vocab_size, group_name, reduce_hidden_grad)
    grads = loops.backward_chunks(
        hidden, weight, bias, targets, row_stats, grad_logps, _config(options, hidden, weight),
        entropy_grad=entropy_grad, entropy=entropy, cache=cache if cache.numel() else None, need_hidden=need_hidden,
        need_weight=need_weight, need_bias=need_bias and bias is not None)
    return tuple(_empty(like) if g is None else g for g, like in zip(grads, (hidden, weight, weight)))


@linear_token_logps_backward.register_fake
def _linear_token_logps_backward_fake(hidden, weight, bias, targets, row_stats, grad_logps, entropy, entropy_grad,
                                      cache, need_hidden, need_weight, need_bias, *options):
    return (torch.empty_like(hidden) if need_hidden else _empty(hidden),
            torch.empty_like(weight) if need_weight else _empty(weight),
            torch.empty_like(bias) if need_bias and bias is not None else _empty(weight))


_OPTION_COUNT = len(LinearOptions._fields)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    options = LinearOptions(*inputs[4:])
    token_logps, row_stats, entropy, mean_logits, is_top1, log_sum_sq_probs, cache = output
    has_entropy = "entropy" in options.extras.split(",")
    ctx.save_for_backward(hidden, weight, bias, targets, row_stats, entropy if has_entropy else None)
    ctx.options = options
    ctx.has_entropy = has_entropy
    ctx.cache = cache  # not saved_tensors: backward overwrites it
    # entropy is often returned for logging only: with no gradient flowing into it, backward gets
    # None (not a zeros tensor) and skips the entropy term
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(row_stats, mean_logits, is_top1, log_sum_sq_probs, cache)


def _backward(ctx, grad_logps, _grad_row_stats, grad_entropy, *_unused):
    hidden, weight, bias, targets, row_stats, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    cache, ctx.cache = ctx.cache, None  # the first backward consumes it; a second one recomputes
    none = (None,) * (4 + _OPTION_COUNT)
    if not (need_hidden or need_weight or need_bias):
        return (None, None, None) + none
    acc = row_stats.dtype
    g = torch.zeros_like(row_stats[:, 0]) if grad_logps is None else grad_logps.to(acc).contiguous()
    ge = grad_entropy.to(acc).contiguous() if ctx.has_entropy and grad_entropy is not None else None
    if cache is None:
        cache = _empty(row_stats, ctx.options.compute_dtype)
    dhidden, dweight, dbias = linear_token_logps_backward(
        hidden, weight, bias, targets, row_stats, g, entropy if ge is not None else None, ge, cache,
        need_hidden, need_weight, need_bias and bias is not None, *ctx.options)
    return (dhidden if need_hidden else None, dweight if need_weight else None,
            dbias if need_bias and bias is not None else None) + none


torch.library.register_autograd("dpo_kernels::linear_token_logps", _backward, setup_context=_setup_context)


def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
          options: LinearOptions) -> loops.ForwardResult:
    """The forward op on compacted tokens, its outputs as a ForwardResult (None for an extra not in
    options.extras). Differentiable: token_logps and entropy."""
    out = linear_token_logps(hidden, weight, bias, targets, *options)
    wanted = options.extras.split(",")
    extras = [value if name in wanted else None for name, value in zip(loops.EXTRAS, out[2:6])]
    return loops.ForwardResult(out[0], out[1], *extras)
