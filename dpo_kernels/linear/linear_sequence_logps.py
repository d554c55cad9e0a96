"""`dk.linear_sequence_logps`: per-sequence log-probs straight from hidden states and the lm_head
weight, through chunked GEMMs and fused tile epilogues, never building the `[N, V]` logits."""

from __future__ import annotations

import inspect
import math
from numbers import Real
from typing import Optional, Sequence

import torch

from .. import reference, validation
from ..backends.availability import resolve_backend
from ..distributed import sharded_weights
from ..distributed.vocab_shard import resolve_vocab_shard
from ..outputs import EXTRAS, LogpsOutput
from ..sequence_reduction import aligned_targets, aligned_weights, reduce_to_sequences
from . import linear_token_logps_op
from .linear_token_logps_op import LinearOptions
from .scored_positions_op import scored_positions


def _check_positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        expected = "a positive finite number" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def compute_dtype_of(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: autocast's when it is enabled for the device (and the inputs are 16/32-bit
    floats), else the inputs' own (which must then agree)."""
    device_type = hidden.device.type
    if (hidden.dtype != torch.float64 and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype outside autocast; "
            "cast one of them, or run under torch.autocast"
        )
    return hidden.dtype


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    average: bool = False,
    token_weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    extras: Sequence[str] = (),
    return_token_logps: bool = False,
    chunk_size: Optional[int] = None,
    cache_budget_bytes: int = 0,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_end: Optional[int] = None,
    reduce_hidden_grad: bool = True,
) -> LogpsOutput:
    """Sum (or mean) over each sequence of log softmax(z)[label], with the logits
    `z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature` never materialised.

    Args:
        hidden: `[S, T, H]` or `[N, H]` (one sequence), fp32/bf16/fp16 (float64 on the CPU backend).
        weight: `[V, H]` (the lm_head / output embedding), same dtype as `hidden` unless autocast is on.
        labels: integer `[S, T]` (or `[N]`); as in `dk.sequence_logps` (`shift`, `ignore_index`).
        bias: `[V]` or None.
        average, token_weights, return_token_logps: as in `dk.sequence_logps`.
        temperature, logit_scale: positive scalars; softcap: Gemma-2's final-logit soft-capping
            `softcap * tanh(u / softcap)` applied to `u = logit_scale * (hidden @ weight.T + bias)`
            before dividing by `temperature`; None disables it.
        extras: any of "entropy" (differentiable), "mean_logits", "is_top1", "log_sum_sq_probs"
            (`log sum_v p_v^2`, what WPO weighs by): per-position `[S, T]` outputs, 0 (False) where
            masked.
        chunk_size: vocabulary columns per GEMM tile; None picks it from the tile budget
            (linear_chunking.DEFAULT_TILE_BYTES: 16 MiB on CPU, 256 MiB on CUDA).
        cache_budget_bytes: when the whole `[N_valid, V]` set of tiles fits in this many bytes,
            forward keeps them and backward skips the GEMM recompute (0, the default: never).
        backend: "auto" (Triton on CUDA, C++ on CPU), "triton", "cuda", "cpu", "reference"
            (full logits through `dk.reference`) or "cuda_emulated" (the CUDA tile epilogues run
            on CPU tensors by their host emulation: slow, for tests; never chosen by "auto").
        process_group: vocabulary parallelism (None: off). `weight` `[V_local, H]` (and `bias`
            `[V_local]`) are this rank's rows `[vocab_start, vocab_end)` of the full lm_head; hidden
            states, labels and the other arguments are the same on every rank of the group, and
            labels are global ids. With `vocab_start` and `vocab_end` None the split is even: every
            rank holds V_local rows and rank r holds `[r * V_local, (r + 1) * V_local)`. Outputs
            are the whole vocabulary's, identical on every rank; every rank must backpropagate
            the same loss. Communication per call: one all-gather of 6 int64 (the layout and a
            labels check), all-reduces of `distributed.forward_payload_rows(extras)` values per
            scored token in forward (3 without extras, 8 with all four), and in backward, with
            `reduce_hidden_grad`, one all-reduce of the `[N_valid, H]` fp32 (float64) hidden
            gradient. See dpo_kernels/distributed/.
        reduce_hidden_grad: with process_group, sum the ranks' shares of the gradient w.r.t.
            `hidden` over the group inside backward (Megatron's "copy to tensor-parallel region");
            False when the caller's framework already all-reduces it (then each rank's
            `hidden.grad` holds its own vocabulary slice's share).

    Only unmasked positions are projected: they are gathered into `[N_valid, H]` first. Under
    `torch.autocast` the GEMMs run in the autocast dtype (inputs are cast chunk by chunk); outside
    it in the inputs' dtype; statistics are always fp32 (float64 for float64 inputs). Gradients flow
    to `hidden`, `weight`, `bias` (each only when it requires grad), `token_weights`, through
    `logps`, `token_logps` and the `entropy` extra.

    `weight` / `bias` may be FSDP2 DTensors (all-gathered for this call, gradients averaged back
    into their shards) or partitioned DeepSpeed ZeRO-3 parameters (gathered for a call that needs
    no gradient for them; untested): see distributed/sharded_weights.py.

    Materialised: the compacted hidden states, one `[N_valid, c]` tile (or every tile, within
    `cache_budget_bytes`) and a few `[N_valid]` statistics in forward; in backward the tile, an
    fp32 `[N_valid, H]` accumulator and the gradients themselves. Peak formula: linear_chunking.py.

    Traces with `torch.compile(fullgraph=True)` (not vocabulary-parallel): the compaction and the
    chunk loops are custom ops (scored_positions_op.py, linear_token_logps_op.py) and N_valid is a
    symbol, so a new mask reuses the compiled graph. Compiled, the hidden states are gathered even
    when every position is scored (eager takes a view then).
    """
    if sharded_weights.needs_zero3_gather(weight, bias):
        sharded_weights.check_no_zero3_gradient(weight, bias)
        arguments = {k: v for k, v in locals().items() if k in _ARGUMENTS}
        with sharded_weights.zero3_gathered(weight, bias):
            return linear_sequence_logps(**arguments)
    validation.check_tensor("hidden", hidden, dims=(2, 3))
    validation.check_tensor("weight", weight, dims=(2,))
    validation.check_backend_name(backend)
    validation.check_int("ignore_index", ignore_index)
    for name, flag in (("shift", shift), ("average", average), ("return_token_logps", return_token_logps)):
        validation.check_bool(name, flag)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a vocabulary (first) dimension of size >= 1, got shape {tuple(weight.shape)}")
    validation.check_same_device("weight", weight, "hidden", hidden)
    if bias is not None:
        validation.check_tensor("bias", bias, dims=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        validation.check_same_device("bias", bias, "hidden", hidden)
    validation.check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    validation.check_same_device("labels", labels, "hidden", hidden)
    validation.check_token_weights(token_weights, labels)
    _check_positive("temperature", temperature)
    _check_positive("logit_scale", logit_scale)
    _check_positive("softcap", softcap, allow_none=True)
    extras = validation.check_extras(extras)
    if chunk_size is not None:
        validation.check_int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    validation.check_int("cache_budget_bytes", cache_budget_bytes)
    if cache_budget_bytes < 0:
        raise ValueError(f"cache_budget_bytes must be >= 0, got {cache_budget_bytes}")
    validation.check_bool("reduce_hidden_grad", reduce_hidden_grad)
    name = resolve_backend(backend, hidden.device)
    validation.check_vocab_parallel(process_group, vocab_start, vocab_end, name)
    if process_group is not None and (sharded_weights.is_dtensor(weight) or sharded_weights.is_dtensor(bias)):
        raise TypeError("weight / bias is a DTensor while process_group is given: for vocabulary parallelism pass "
                        "this rank's rows as a plain tensor (weight.to_local()) with the range they hold")
    for arg, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None:
            validation.check_float_dtype(arg, tensor, name)
    compute_dtype = compute_dtype_of(hidden, weight)
    if bias is not None and bias.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(f"bias ({bias.dtype}) must have the dtype of weight ({weight.dtype}) outside autocast")
    V = weight.shape[0]
    shard = None
    if process_group is not None:  # collective: every rank agrees on the layout before any work
        shard = resolve_vocab_shard(process_group, vocab_start, vocab_end, V, labels, holder="weight")
    validation.check_label_range(labels, V if shard is None else shard.vocab_size, ignore_index)
    weight, bias = sharded_weights.gather_dtensors(weight, bias)

    unbatched = hidden.dim() == 2
    if unbatched:
        hidden, labels = hidden.unsqueeze(0), labels.unsqueeze(0)
        token_weights = None if token_weights is None else token_weights.unsqueeze(0)
    S, T = labels.shape

    if name == "reference":
        acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
        ref = reference.linear_sequence_logps(
            hidden, weight, labels.to(torch.int64), bias, ignore_index=ignore_index, shift=shift, average=average,
            token_weights=token_weights, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            compute_dtype=acc,
        )
        per_position = {"token_logps": ref.token_logps, **{e: getattr(ref, e) for e in extras}}
        logps, num_tokens = ref.logps, ref.num_tokens
    else:
        targets = aligned_targets(labels, shift, ignore_index)
        valid = targets != ignore_index
        s_idx, t_idx = scored_positions(targets, ignore_index, V if shard is None else shard.vocab_size)
        # every position scored (the caller compacted already): a view if possible. Under
        # torch.compile N is a symbol, not a number: the gather is traced instead.
        if not torch.compiler.is_compiling() and s_idx.numel() == S * T:
            hidden_valid = hidden.reshape(S * T, hidden.shape[-1])
        else:
            hidden_valid = hidden[s_idx, t_idx]  # [N_valid, H]: the only positions that reach a GEMM
        targets_valid = targets[s_idx, t_idx]
        if shard is not None:
            targets_valid = targets_valid - shard.start  # this rank's ids; others' targets never match
        options = LinearOptions(
            backend=name, pre_scale=float(logit_scale), softcap=float(softcap or 0.0),
            post_scale=1.0 / float(temperature),
            chunk_size=chunk_size or 0, cache_budget_bytes=cache_budget_bytes, compute_dtype=compute_dtype,
            extras=",".join(extras), vocab_size=V if shard is None else shard.vocab_size,
            group_name=None if shard is None else shard.group.group_name, reduce_hidden_grad=reduce_hidden_grad,
        )
        outputs = linear_token_logps_op.apply(hidden_valid, weight, bias, targets_valid, options)
        acc = outputs[0].dtype
        per_position = {}
        for key, values in zip(("token_logps", "row_stats") + EXTRAS, outputs):
            if key == "token_logps" or key in extras:
                per_position[key] = _scatter(values, s_idx, t_idx, S, T)
        weights = None if token_weights is None else aligned_weights(token_weights, shift, acc)
        logps, num_tokens = reduce_to_sequences(per_position["token_logps"], valid, weights, average)

    result = {}
    for key, values in per_position.items():
        if key == "token_logps" and not return_token_logps:
            continue
        result[key] = values[0] if unbatched else values
    return LogpsOutput(logps=logps, num_tokens=num_tokens, **result)


_ARGUMENTS = tuple(inspect.signature(linear_sequence_logps).parameters)


def _scatter(values: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor, S: int, T: int) -> torch.Tensor:
    """`[S, T]` tensor holding `values` at the compacted positions and 0 (False) elsewhere."""
    out = torch.zeros((S, T), dtype=values.dtype, device=values.device)
    return out.index_put((s_idx, t_idx), values)
