"""The linear path's peak extra memory equals the formula in dpo_kernels/linear/linear_chunking.py, and
is `O(tile + N * H)`, far below the `[N, V]` logits.

Allocations are counted exactly (benchmarks/peak_memory.allocation_peak_bytes: a dispatch mode
that sees every storage PyTorch creates and frees during the call); the C++ kernels allocate
nothing. The formula's small terms (per-token statistics, `[S, T]` outputs, index tensors) are
not modelled, so the measurement may exceed it by SMALL_BYTES, and it may not fall below it.
"""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from benchmarks.peak_memory import allocation_peak_bytes
from dpo_kernels.linear.linear_chunking import linear_peak_bytes

SMALL_BYTES = 96 << 10  # per-token statistics and [S, T] tensors at these shapes: well under 96 KiB


def _setup(dtype, bias):
    torch.manual_seed(0)
    S, T, H, V = 4, 256, 128, 8192
    hidden = torch.randn(S, T, H, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H) / H ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (S, T))
    labels[:, :56] = -100  # prompts: compacted away
    return hidden, weight, b, labels


@pytest.mark.parametrize("dtype,bias,cache", [(torch.float32, False, False), (torch.float32, True, True),
                                              (torch.bfloat16, True, False)], ids=["fp32", "fp32-bias-cached",
                                                                                  "bf16-bias"])
def test_peak_memory_matches_the_formula(dtype, bias, cache):
    if dk.backends.availability.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the C++ CPU backend is not built")
    hidden, weight, b, labels = _setup(dtype, bias)
    chunk = 1024
    budget = 1 << 40 if cache else 0
    kwargs = dict(chunk_size=chunk, cache_budget_bytes=budget, backend="cpu")
    S, T, H = hidden.shape
    V = weight.shape[0]
    N = int((labels != -100).sum())

    def forward():
        return dk.linear_sequence_logps(hidden, weight, labels, b, **kwargs).logps

    def forward_backward():
        out = dk.linear_sequence_logps(hidden, weight, labels, b, **kwargs)
        return torch.autograd.grad(out.logps.sum(), [t for t in (hidden, weight, b) if t is not None])

    formula = dict(num_tokens=N, positions=S * T, hidden_size=H, vocab_size=V, chunk_size=chunk, compute_dtype=dtype,
                   hidden_dtype=dtype, weight_dtype=dtype, has_bias=bias, num_stats=3, cached=cache)
    for fn, backward in ((forward, False), (forward_backward, True)):
        expected = linear_peak_bytes(backward=backward, **formula)
        measured = allocation_peak_bytes(fn)
        assert expected <= measured <= expected + SMALL_BYTES, (backward, measured, expected)

    logits_bytes = N * V * torch.empty((), dtype=dtype).element_size()
    if not cache:  # one tile and O(N H): a fraction of the logits the reference would build
        assert linear_peak_bytes(backward=False, **formula) < logits_bytes / 4


def test_default_chunk_follows_the_tile_budget():
    from dpo_kernels.linear.linear_chunking import DEFAULT_TILE_BYTES, MIN_CHUNK, choose_chunk_size  # noqa: PLC0415

    c = choose_chunk_size(2048, 32000, 4, "cpu")
    assert c % MIN_CHUNK == 0 and 2048 * c * 4 <= DEFAULT_TILE_BYTES["cpu"] < 2048 * (c + MIN_CHUNK) * 4
    assert choose_chunk_size(10, 300, 4, "cpu") == 300  # everything in one chunk
    assert choose_chunk_size(10 ** 9, 32000, 2, "cuda") == MIN_CHUNK  # never below the minimum
