"""pytest-benchmark: the linear path's DPO loss (from hidden states and the lm_head weight), forward
and forward + backward, against the peers.

    pytest benchmarks/test_linear_dpo_loss.py --benchmark-only                      # the device's grid
    DPO_BENCH_SMOKE=1 pytest benchmarks/test_linear_dpo_loss.py --benchmark-disable  # tiny, for CI

Every implementation gets the same hidden states `[2B, T, H]`, lm_head weight `[V, H]` (both in the
dtype), labels (the first `T // 4` positions of each row masked, as prompts are; the other N positions
scored) and precomputed reference log-probs (zeros), and computes the sigmoid DPO loss (beta 0.1),
with its gradients w.r.t. hidden and weight in forward + backward (`torch.autograd.grad`); forward
runs under `torch.no_grad()`, as a reference model's pass does:

- reference: the full logits `hidden @ weight.T` in the dtype, `dk.reference.sequence_logps`
  (`log_softmax` of the fp32 upcast, gather, masked sum), `dk.dpo_loss`, autograd;
- reference_compiled: `torch.compile(dynamic=True)` of the same function, compiled in the warm-up;
- dk_<backend>: `dk.fused_linear_dpo_loss(backend=...)` for each backend usable on the device;
- dk_<backend>_cached (forward + backward): the same with `cache_budget_bytes` large enough to keep
  every tile from forward for backward: no recompute (`6 N H V` instead of `8 N H V`) for `N * V`
  more bytes, the speed end of the trade-off;
- dk_<backend>_eager (forward + backward): `eager_backward=True`: the gradients taken in forward,
  one pair at a time, from that pair's cached tiles: `6 N H V` for one pair's `[N_pair, V]` tiles;
- trl_chunked: TRL's `ChunkedLogProbFunction` on the scored tokens (chunks of 4096 columns; Triton
  epilogues on GPU, torch ops on CPU), per-sequence sums, `dk.dpo_loss`;
- liger: Liger's `LigerFusedLinearDPOLoss` (its reference-free form, which with reference log-probs
  of 0 is the same loss); compiled with torch.compile on GPU (Liger's default), eager on CPU, where
  compiling its per-chunk graphs would dominate the suite's run time;
- cce: Apple's Cut Cross-Entropy, `linear_cross_entropy(reduction="none")` negated and summed per
  sequence, then `dk.dpo_loss`; its default Triton implementation on GPU, `impl="torch_compile"` on
  CPU. Gradient filtering is off (`filter_eps=None`): CCE's default skips vocabulary blocks whose
  probabilities are all below 2^-12 in bf16, an approximation of the gradient that the agreement
  check below would (rightly) reject.

A peer that cannot be imported is skipped (its rows say why). Each row's loss and gradients are checked against the
float64 oracle (benchmarks/agreement.py) before it is timed. `extra_info` holds the peak extra memory
(benchmarks/peak_memory.py), ratios to the reference row of the same run, and the achieved TFLOP/s
over the GEMM work of the N scored tokens: `2 * N * H * V` forward, `8 * N * H * V` forward +
backward with the logits recomputed (the reference projects the prompt positions too, and keeps its
logits instead of recomputing them).
"""

from __future__ import annotations

import functools

import pytest
import torch

import dpo_kernels as dk
from benchmarks.agreement import check_linear_loss, linear_loss_oracle
from benchmarks.bench_grid import (
    DEVICE,
    KERNEL_BACKENDS,
    ON_GPU,
    benchmark_cases,
    for_grid_point,
    linear_shapes,
    prompt_length,
)
from benchmarks.bench_record import measure_row

PATH = "linear"
MODES = ("forward", "forward_backward")
BETA = 0.1
PEERS = {"trl_chunked": "trl.kernels.chunked_logprob", "liger": "liger_kernel.chunked_loss",
         "cce": "cut_cross_entropy"}  # the module each peer's row imports: the row is skipped without it


def _impls(mode: str) -> list:
    cached = ([f"dk_{b}_{variant}" for b in KERNEL_BACKENDS for variant in ("cached", "eager")]
              if mode == "forward_backward" else [])
    return ["reference", "reference_compiled"] + [f"dk_{b}" for b in KERNEL_BACKENDS] + cached + list(PEERS)


def _dpo(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    B = ref.shape[0]
    return dk.dpo_loss(logps[:B], logps[B:], ref, ref, beta=BETA).loss


def reference_loss(hidden, weight, labels, ref):
    logits = hidden @ weight.T
    return _dpo(dk.reference.sequence_logps(logits, labels).logps, ref)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference_loss, dynamic=True)


def _dk_loss(backend, cache_budget_bytes=0, eager_backward=False):
    def loss(hidden, weight, labels, ref):
        return dk.fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref, ref_rejected_logps=ref,
                                        beta=BETA, backend=backend, cache_budget_bytes=cache_budget_bytes,
                                        eager_backward=eager_backward).loss
    return loss


def _trl_chunked_loss(hidden, weight, labels, ref):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: PLC0415

    valid = labels != -100
    seq, _ = valid.nonzero(as_tuple=True)
    token_logps = ChunkedLogProbFunction.apply(hidden[valid], weight, None, labels[valid], 1.0, 4096, None, 1.0, ())[0]
    logps = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device).index_add(0, seq, token_logps)
    return _dpo(logps, ref)


@functools.lru_cache(maxsize=None)
def _liger_module():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: PLC0415

    return LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=ON_GPU)


def _liger_loss(hidden, weight, labels, ref):
    out = _liger_module()(weight, hidden, labels)
    return out[0] if isinstance(out, tuple) else out


def _cce_loss(hidden, weight, labels, ref):
    from cut_cross_entropy import linear_cross_entropy  # noqa: PLC0415

    impl = {} if ON_GPU else {"impl": "torch_compile"}
    token_nll = linear_cross_entropy(hidden, weight, labels, reduction="none", filter_eps=None, **impl)
    return _dpo(-token_nll.float().sum(-1), ref)


def _loss_function(impl: str):
    if impl == "reference":
        return reference_loss
    if impl == "reference_compiled":
        return _compiled_reference()
    if impl.startswith("dk_") and impl.endswith("_cached"):
        return _dk_loss(impl.removeprefix("dk_").removesuffix("_cached"), cache_budget_bytes=1 << 62)
    if impl.startswith("dk_") and impl.endswith("_eager"):
        return _dk_loss(impl.removeprefix("dk_").removesuffix("_eager"), eager_backward=True)
    if impl.startswith("dk_"):
        return _dk_loss(impl.removeprefix("dk_"))
    return {"trl_chunked": _trl_chunked_loss, "liger": _liger_loss, "cce": _cce_loss}[impl]


def _inputs(shape, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = 2 * shape.B
    hidden = torch.empty(rows, shape.T, shape.H, dtype=dtype, device=DEVICE).normal_(generator=gen)
    weight = torch.empty(shape.V, shape.H, dtype=dtype, device=DEVICE).normal_(0.0, shape.H ** -0.5, generator=gen)
    labels = torch.randint(0, shape.V, (rows, shape.T), generator=gen, device=DEVICE)
    labels[:, :prompt_length(shape.T)] = -100
    ref = torch.zeros(shape.B, device=DEVICE)
    return hidden, weight, labels, ref


def _point(shape, dtype):
    """The grid point's inputs and a dict for its oracle, kept while the suite is at this point."""
    return for_grid_point((PATH, shape, dtype), lambda: (_inputs(shape, dtype), {}))


def _oracle(shape, dtype):
    """The float64 oracle of the grid point, gradients included: computed once, for its first row."""
    (hidden, weight, labels, ref), cache = _point(shape, dtype)
    if "oracle" not in cache:
        cache["oracle"] = linear_loss_oracle(hidden, weight, labels, lambda logps: _dpo(logps, ref.double()))
    return cache["oracle"]


@pytest.mark.parametrize("shape,dtype,mode,impl", benchmark_cases(linear_shapes(), MODES, _impls))
def test_linear_dpo_loss(benchmark, shape, dtype, mode, impl):
    if impl in PEERS:
        pytest.importorskip(PEERS[impl])
    hidden, weight, labels, ref = _point(shape, dtype)[0]
    loss_of = _loss_function(impl)

    if mode == "forward":
        def setup():
            return hidden, weight

        def step(h, w):
            with torch.no_grad():
                return (loss_of(h, w, labels, ref),)
    else:
        def setup():
            return hidden.detach().requires_grad_(), weight.detach().requires_grad_()

        def step(h, w):
            loss = loss_of(h, w, labels, ref)
            return (loss.detach(), *torch.autograd.grad(loss, [h, w]))

    outputs = step(*setup())  # the warm-up: compiles what needs compiling
    check_linear_loss(impl, _oracle(shape, dtype), *outputs)
    del outputs

    work = (2 if mode == "forward" else 8) * shape.tokens * shape.H * shape.V
    measure_row(benchmark, path=PATH, mode=mode, impl=impl, dtype=dtype, shape=shape, step=step, setup=setup,
                flops=work)
