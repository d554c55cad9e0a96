"""The vocabulary-parallel logits path on real gloo process groups (CPU, 2 and 4 ranks): each rank
holds `[S, T, V_local]` logits columns; log-probs and the logits gradient of each slice equal the
single-process computation (also at logits of +-1e4, with -inf entries, in bf16, and with
`inplace_backward`), and so do the per-token extras (entropy with its gradient, mean_logits,
is_top1 with row maxima tied across ranks, log_sum_sq_probs); `fused_dpo_loss` with a process group equals the single-process loss; backward
communicates nothing and forward 3 values per position (8 with extras). Spawned workers: python_tests/helpers/distributed.py."""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.distributed import CollectiveBytes, even_ranges, requires_gloo, run_ranks, uneven_ranges

pytestmark = requires_gloo

CASES = [
    ("even-shift-weights", dict(split="even", shift=True, weights=True)),
    ("uneven-average-masked-row", dict(split="uneven", average=True, mask="all_masked_row")),
    ("uneven-float64", dict(split="uneven", dtype=torch.float64, shift=True, weights=True)),
    ("even-bf16-inplace", dict(split="even", dtype=torch.bfloat16, inplace=True)),
    ("uneven-inplace-strided", dict(split="uneven", inplace=True, strided=True)),
    ("even-extreme", dict(split="even", extreme=True)),
    ("uneven-extreme-neg-inf", dict(split="uneven", extreme=True, neg_inf=True)),
    ("even-nothing-scored", dict(split="even", mask="all")),
    ("uneven-triton-inplace", dict(split="uneven", backend="triton", shift=True, weights=True, inplace=True)),
    ("even-extras-ties-bf16", dict(split="even", extras=True, ties=True, shift=True, dtype=torch.bfloat16)),
    ("uneven-extras-inplace-masked-row", dict(split="uneven", extras=True, ties=True, inplace=True,
                                              mask="all_masked_row")),
    ("even-extras-extreme-neg-inf", dict(split="even", extras=True, extreme=True, neg_inf=True)),
    ("uneven-extras-triton", dict(split="uneven", extras=True, ties=True, backend="triton", weights=True)),
]
EXTRAS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _unit(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8}[dtype]


def assert_close(name, got, want, tol):
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if not want.numel():
        return
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and torch.equal(got[~finite], want[~finite]), name
    scale = max(1.0, float(want[finite].abs().max())) if finite.any() else 1.0
    err = float((got[finite].double() - want[finite].double()).abs().max()) if finite.any() else 0.0
    assert err <= tol * scale, (name, err, scale)


def _inputs(opts, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = opts.get("dtype", torch.float32)
    S, T = 4, 5
    logits = torch.randn(S, T, V, generator=g, dtype=torch.float64) * 3
    if opts.get("extreme"):
        logits = logits * 3000  # +-1e4
    if opts.get("neg_inf"):
        logits[0, :, : V // 2] = float("-inf")  # whole slices of some rows are -inf
        logits[1, 1, 1::3] = float("-inf")
    labels = torch.randint(0, V, (S, T), generator=g)
    if opts.get("ties"):  # row 0's max at columns 0 and V - 2, held by different ranks
        for t, target in ((2, V - 2), (3, 0)):  # argmax's first index: t = 2 False, t = 3 True
            top = logits[0, t].max() + 1
            logits[0, t, 0] = logits[0, t, V - 2] = top
            labels[0, t + 1 if opts.get("shift") else t] = target
    logits = logits.to(dtype)
    if opts.get("neg_inf"):
        labels[0] = torch.randint(V // 2, V, (T,), generator=g)  # targets with finite logits
    mask = opts.get("mask", "prompt")
    if mask == "prompt":
        labels[:, :1] = -100
    elif mask == "all_masked_row":
        labels[2] = -100
    elif mask == "all":
        labels[:] = -100
    weights = torch.rand(S, T, generator=g, dtype=torch.float64).to(dtype) if opts.get("weights") else None
    coefs = [torch.randn(S, T, generator=g, dtype=torch.float64) for _ in range(3)]
    return logits, labels, weights, coefs


def _run(opts, logits, labels, weights, coefs, **distributed):
    if opts.get("strided"):  # a view with row padding: read in place, never copied
        padded = torch.zeros(*logits.shape[:-1], logits.shape[-1] + 3, dtype=logits.dtype)
        padded[..., : logits.shape[-1]] = logits
        leaf = padded.requires_grad_()
        x = (leaf * 1)[..., : logits.shape[-1]]  # a non-leaf view, rows V + 3 apart
    else:
        leaf = logits.detach().clone().requires_grad_()
        x = leaf * 1 if opts.get("inplace") else leaf  # in-place backward needs a non-leaf
    out = dk.sequence_logps(x, labels, shift=opts.get("shift", False), average=opts.get("average", False),
                            token_weights=weights, return_token_logps=True,
                            inplace_backward=opts.get("inplace", False), backend=opts.get("backend", "cpu"),
                            extras=EXTRAS if opts.get("extras") else (), **distributed)
    c_seq, c_tok, c_ent = coefs
    loss = (out.logps * c_seq[:, 0].to(out.logps.dtype)).sum() + (out.token_logps * c_tok.to(out.logps.dtype)).sum()
    if opts.get("extras"):
        loss = loss + (out.entropy * c_ent.to(out.logps.dtype)).sum()
    grad = torch.autograd.grad(loss, leaf)[0] if loss.requires_grad else None
    if grad is not None and opts.get("strided"):
        grad = grad[..., : logits.shape[-1]]
    return out, grad


def _check_cases(rank, world):
    import torch.distributed as dist  # noqa: PLC0415

    for name, opts in CASES:
        if opts.get("backend", "cpu") not in dk.available_backends("cpu"):
            continue  # Triton without its interpreter (TRITON_INTERPRET=1, set by conftest.py without CUDA)
        if opts["split"] == "even":
            V = 11 * world
            ranges = even_ranges(V, world)
        else:
            V, ranges = uneven_ranges(world)
        start, end = ranges[rank]
        logits, labels, weights, coefs = _inputs(opts, V)
        dtype = logits.dtype
        want, want_grad = _run(opts, logits, labels, weights, coefs)
        split = {} if opts["split"] == "even" else dict(vocab_start=start, vocab_end=end)
        got, got_grad = _run(opts, logits[..., start:end], labels, weights, coefs, process_group=dist.group.WORLD,
                             **split)
        stat_tol = 1e-10 if dtype == torch.float64 else 1e-5  # statistics are fp32 (float64) whatever the input
        assert torch.equal(got.num_tokens, want.num_tokens), name
        assert_close(f"{name} logps", got.logps, want.logps, stat_tol)
        assert_close(f"{name} token_logps", got.token_logps, want.token_logps, stat_tol)
        if opts.get("extras"):
            for extra in ("entropy", "mean_logits", "log_sum_sq_probs"):
                assert_close(f"{name} {extra}", getattr(got, extra), getattr(want, extra), stat_tol)
            assert torch.equal(got.is_top1, want.is_top1), name
            if opts.get("ties"):
                assert not want.is_top1[0, 2] and want.is_top1[0, 3], name
        if want_grad is None:
            assert got_grad is None, name
            continue
        assert_close(f"{name} grad logits", got_grad, want_grad[..., start:end], _unit(dtype))


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_single_process(world_size, tmp_path):
    run_ranks(_check_cases, world_size, tmp_path)


def _check_fused_dpo_loss(rank, world):
    import torch.distributed as dist  # noqa: PLC0415

    V, ranges = uneven_ranges(world)
    start, end = ranges[rank]
    g = torch.Generator().manual_seed(1)
    B, T = 2, 6
    logits = torch.randn(2 * B, T, V, generator=g) * 2
    ref_logits = torch.randn(2 * B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    labels[B:, -1] = -100
    options = dict(shift=True, beta=0.3, loss_type=["ipo", "sft"], loss_weights=[1.0, 0.2], ld_alpha=0.5,
                   backend="cpu")

    def run(x, rx, **distributed):
        leaf = x.detach().clone().requires_grad_()
        out = dk.fused_dpo_loss(leaf, labels, ref_logits=rx, **options, **distributed)
        return out, torch.autograd.grad(out.loss, leaf)[0]

    want, want_grad = run(logits, ref_logits)
    got, got_grad = run(logits[..., start:end], ref_logits[..., start:end], process_group=dist.group.WORLD,
                        vocab_start=start, vocab_end=end)
    for field in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert_close(field, getattr(got, field), getattr(want, field), 1e-5)
    assert set(got.metrics) == set(want.metrics)
    for key, value in want.metrics.items():
        assert abs(got.metrics[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, got.metrics[key], value)
    assert_close("grad logits", got_grad, want_grad[..., start:end], 1e-5)


def test_fused_dpo_loss_matches_single_process(tmp_path):
    run_ranks(_check_fused_dpo_loss, 2, tmp_path)


def _check_communication(rank, world):
    """LAYOUT_INTS int64 and 3 fp32 per position in forward, nothing in backward; the same for V and 8 V."""
    import torch.distributed as dist  # noqa: PLC0415

    from dpo_kernels.distributed import LAYOUT_INTS  # noqa: PLC0415

    counter = CollectiveBytes()
    S, T = 3, 7
    for V_local in (10, 80):
        g = torch.Generator().manual_seed(2)
        logits = torch.randn(S, T, V_local, generator=g, requires_grad=True)
        labels = torch.randint(0, V_local * world, (S, T), generator=g)
        labels[:, :3] = -100
        counter.reset()
        with counter.counting():
            out = dk.sequence_logps(logits, labels, backend="cpu", process_group=dist.group.WORLD)
            forward = counter.total()
            out.logps.sum().backward()
        assert forward == LAYOUT_INTS * 8 + 3 * S * T * 4, (V_local, forward)
        assert counter.total() == forward, "backward communicates nothing"
        assert {name for name, _ in counter.calls} == {"all_gather", "all_reduce"}
        counter.reset()
        with counter.counting():  # with every extra: 8 values per position, still nothing in backward
            out = dk.sequence_logps(logits, labels, backend="cpu", process_group=dist.group.WORLD, extras=EXTRAS)
            forward = counter.total()
            (out.logps.sum() + out.entropy.sum()).backward()
        assert forward == LAYOUT_INTS * 8 + 8 * S * T * 4, (V_local, forward)
        assert counter.total() == forward, "backward communicates nothing"


def test_communication_is_three_values_per_position(tmp_path):
    run_ranks(_check_communication, 2, tmp_path)


def _check_errors(rank, world):
    import torch.distributed as dist  # noqa: PLC0415

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (2, 3), generator=g)
    with pytest.raises(ValueError, match="same number"):
        dk.sequence_logps(torch.randn(2, 3, 5 + rank), labels, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="tile"):
        dk.sequence_logps(torch.randn(2, 3, 5), labels, process_group=dist.group.WORLD, vocab_start=0, vocab_end=5)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        dk.sequence_logps(torch.randn(2, 3, 5), labels + 5, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="backend='reference'"):
        dk.sequence_logps(torch.randn(2, 3, 5), labels, process_group=dist.group.WORLD, backend="reference")
    out = dk.sequence_logps(torch.randn(2, 3, 5), labels, process_group=dist.group.WORLD)
    assert torch.isfinite(out.logps).all()


def test_layout_errors_are_raised_on_every_rank(tmp_path):
    run_ranks(_check_errors, 2, tmp_path)


def test_process_group_needs_initialised_torch_distributed():
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        dk.sequence_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64), process_group=object())
    with pytest.raises(ValueError, match="vocab_start is given without process_group"):
        dk.sequence_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64), vocab_start=0)
