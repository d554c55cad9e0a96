"""pytest-benchmark: the linear path's DPO loss, forward + backward, against the peers.

    pytest benchmarks/test_linear_dpo_loss.py --benchmark-only           # CPU shape of issue 4
    DPO_BENCH_SMOKE=1 pytest benchmarks/test_linear_dpo_loss.py --benchmark-disable   # tiny, for CI

Every implementation gets the same hidden states `[2B, T, H]`, lm_head weight `[V, H]`, labels
(the first PROMPT positions of each row masked, as prompts are) and precomputed reference
log-probs, and computes the sigmoid DPO loss and its gradients w.r.t. hidden and weight:

- reference: full fp32 logits `hidden @ weight.T`, `dk.reference.sequence_logps`, `dk.dpo_loss`;
- dpo_kernels: `dk.fused_linear_dpo_loss(backend="auto")`;
- trl_chunked: TRL 1.16's `ChunkedLogProbFunction` on the valid tokens (its CPU fallback folds tiles
  with torch ops), per-sequence sums, `dk.dpo_loss`;
- liger: Liger's `LigerFusedLinearDPOLoss` (reference-free form, which with precomputed reference
  log-probs of 0 is the same loss), uncompiled.

Each row's `extra_info` holds the loss (checked against the reference's), the peak extra bytes of
one forward+backward (benchmarks/peak_memory.allocation_peak_bytes: every storage PyTorch creates
during the call, counted until freed), and both as ratios to the reference measured in this run.
"""

from __future__ import annotations

import os

import pytest
import torch

import dpo_kernels as dk
from peak_memory import allocation_peak_bytes

SMOKE = os.environ.get("DPO_BENCH_SMOKE", "0") == "1"
B, T, H, V = (2, 16, 32, 500) if SMOKE else (4, 256, 512, 32000)
PROMPT = T // 4
BETA = 0.1
IMPLEMENTATIONS = ("reference", "dpo_kernels", "trl_chunked", "liger")
_reference_row = {}


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * B, T, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :PROMPT] = -100
    zeros = torch.zeros(B)
    return hidden, weight, labels, zeros


def _reference(hidden, weight, labels, ref):
    logits = hidden @ weight.T
    logps = dk.reference.sequence_logps(logits, labels).logps
    return dk.dpo_loss(logps[:B], logps[B:], ref, ref, beta=BETA).loss


def _dpo_kernels(hidden, weight, labels, ref):
    return dk.fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref, ref_rejected_logps=ref,
                                    beta=BETA).loss


def _trl_chunked(hidden, weight, labels, ref):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: PLC0415

    valid = labels != -100
    s_idx, _ = valid.nonzero(as_tuple=True)
    token_logps = ChunkedLogProbFunction.apply(hidden[valid], weight, None, labels[valid], 1.0, 4096, None, 1.0, ())[0]
    logps = torch.zeros(2 * B, dtype=token_logps.dtype).index_add(0, s_idx, token_logps)
    return dk.dpo_loss(logps[:B], logps[B:], ref, ref, beta=BETA).loss


def _liger(hidden, weight, labels, ref):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: PLC0415

    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=False)
    out = loss_fn(weight, hidden, labels)
    return out[0] if isinstance(out, tuple) else out


RUNNERS = {"reference": _reference, "dpo_kernels": _dpo_kernels, "trl_chunked": _trl_chunked, "liger": _liger}
NEEDS = {"trl_chunked": "trl", "liger": "liger_kernel"}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_linear_dpo_loss_forward_backward(benchmark, impl):
    if impl in NEEDS:
        pytest.importorskip(NEEDS[impl])
    hidden, weight, labels, ref = _inputs()
    run = RUNNERS[impl]

    def step():
        loss = run(hidden, weight, labels, ref)
        grads = torch.autograd.grad(loss, [hidden, weight])
        return loss.detach(), grads

    loss, grads = step()  # warm-up, and the values checked below
    peak = allocation_peak_bytes(step)
    rounds = 1 if SMOKE else 3
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)

    ref_loss, ref_grads = _reference_values()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())

    info = benchmark.extra_info
    info.update(shape=dict(B=B, T=T, H=H, V=V, valid_tokens=int((labels != -100).sum())), dtype="float32",
                device="cpu", threads=torch.get_num_threads(), loss=float(loss), peak_extra_bytes=peak)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None:
        info["median_s"] = stats.median
        if impl == "reference":
            _reference_row.update(median_s=stats.median, peak=peak)
        if _reference_row:
            info["time_vs_reference"] = stats.median / _reference_row["median_s"]
            info["memory_vs_reference"] = peak / max(_reference_row["peak"], 1)


_cache = {}


def _reference_values():
    if "values" not in _cache:
        hidden, weight, labels, ref = _inputs()
        loss = _reference(hidden, weight, labels, ref)
        _cache["values"] = (loss.detach(), torch.autograd.grad(loss, [hidden, weight]))
    return _cache["values"]

