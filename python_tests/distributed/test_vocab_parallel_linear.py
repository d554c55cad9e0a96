"""The vocabulary-parallel linear path on real gloo process groups (CPU, 2 and 4 ranks): each rank
holds rows of the lm_head and the results, every extra and every gradient (hidden, the local weight
and bias rows) equal the single-process computation; the layout errors; the communication per call
is the documented O(N) formula, independent of V. `fused_linear_dpo_loss` with a process group
equals the single-process loss. Spawned workers: python_tests/helpers/distributed.py."""

from __future__ import annotations

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.distributed import CollectiveBytes, even_ranges, requires_gloo, run_ranks, uneven_ranges

pytestmark = requires_gloo

ALL_EXTRAS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")

# (name, options): split "even" (vocab_start/vocab_end None) or "uneven" (explicit, reversed order)
CASES = [
    ("even-shift-bias-weights-all-extras", dict(split="even", bias=True, shift=True, weights=True, extras=ALL_EXTRAS,
                                               entropy_grad=True, chunk_size=5)),
    ("uneven-transforms-average-masked-row", dict(split="uneven", bias=True, extras=ALL_EXTRAS, entropy_grad=True,
                                                  temperature=0.7, logit_scale=1.3, softcap=3.0, chunk_size=4,
                                                  average=True, mask="all_masked_row")),
    ("uneven-float64-cached", dict(split="uneven", dtype=torch.float64, bias=True, shift=True, extras=ALL_EXTRAS,
                                   entropy_grad=True, cache=True, unbatched=False)),
    ("even-no-hidden-reduce", dict(split="even", extras=("entropy",), entropy_grad=True, reduce_hidden_grad=False)),
    ("even-top1-ties-across-ranks", dict(split="even", bias=True, ties=True, extras=("is_top1",))),
    ("uneven-nothing-scored", dict(split="uneven", mask="all", bias=True, extras=ALL_EXTRAS)),
    ("even-unbatched", dict(split="even", unbatched=True, extras=("log_sum_sq_probs", "mean_logits"))),
    # the Triton tile epilogues (interpreted on CPU) with targets outside the local slice
    ("uneven-triton", dict(split="uneven", backend="triton", bias=True, shift=True, extras=ALL_EXTRAS,
                           entropy_grad=True, chunk_size=5)),
]


def _tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_close(name, got, want, dtype):
    """|got - want| <= tol * max(1, max |want|): 1e-5 relative for fp32, 1e-10 for float64."""
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if want.dtype == torch.bool or not want.dtype.is_floating_point:
        assert torch.equal(got, want), (name, got, want)
        return
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert err <= _tolerance(dtype) * scale, (name, err, scale)


def _ranges(split, world, V_even):
    if split == "even":
        return V_even, even_ranges(V_even, world)
    return uneven_ranges(world)


def _inputs(opts, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = opts.get("dtype", torch.float32)
    S, T, H = 4, 6, 8
    hidden = torch.randn(S, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if opts.get("bias") else None
    labels = torch.randint(0, V, (S, T), generator=g)
    mask = opts.get("mask", "prompt")
    if mask == "prompt":
        labels[:, :2] = -100
    elif mask == "all_masked_row":
        labels[1] = -100
    elif mask == "all":
        labels[:] = -100
    if opts.get("ties"):
        # logits = bias exactly (zero hidden states); the maximum is reached at three ids held by
        # different ranks, and labels pick each of them: only the smallest is the (first) argmax
        hidden.zero_()
        tied = [1, V // 2 + 1, V - 1]
        bias[tied] = 10.0
        labels[:, 2:5] = torch.tensor(tied)
    weights = torch.rand(S, T, generator=g, dtype=torch.float64).to(dtype) if opts.get("weights") else None
    coefs = [torch.randn(S, T, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    if opts.get("unbatched"):
        hidden, labels = hidden[0], labels[0]
        weights = None if weights is None else weights[0]
        coefs = [c[0] for c in coefs]
    return hidden, weight, bias, labels, weights, coefs


def _run(opts, hidden, weight, bias, labels, token_weights, coefs, **distributed):
    """Output and gradients (hidden, weight, bias) of a loss using logps, token_logps and entropy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    out = dk.linear_sequence_logps(
        h, w, labels, b, shift=opts.get("shift", False), average=opts.get("average", False),
        token_weights=token_weights, temperature=opts.get("temperature", 1.0),
        logit_scale=opts.get("logit_scale", 1.0), softcap=opts.get("softcap"), extras=opts.get("extras", ()),
        return_token_logps=True, chunk_size=opts.get("chunk_size"),
        cache_budget_bytes=(1 << 30) if opts.get("cache") else 0, backend=opts.get("backend", "cpu"), **distributed,
    )
    c_seq, c_tok, c_ent = coefs
    loss = (out.logps * c_seq.reshape(-1)[: out.logps.numel()].to(out.logps.dtype)).sum()
    loss = loss + (out.token_logps * c_tok.to(out.token_logps.dtype)).sum()
    if opts.get("entropy_grad"):
        loss = loss + (out.entropy * c_ent.to(out.entropy.dtype)).sum()
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad else [None] * len(wanted)
    grads = dict(zip(("hidden", "weight", "bias"), list(grads) + [None]))
    return out, grads


def _check_cases(rank, world):
    import torch.distributed as dist  # noqa: PLC0415

    for name, opts in CASES:
        if opts.get("backend", "cpu") not in dk.available_backends("cpu"):
            continue  # Triton without its interpreter (TRITON_INTERPRET=1, set by conftest.py without CUDA)
        V_even = 13 * world
        V, ranges = _ranges(opts["split"], world, V_even)
        start, end = ranges[rank]
        hidden, weight, bias, labels, weights, coefs = _inputs(opts, V)
        dtype = hidden.dtype
        want, want_grads = _run(opts, hidden, weight, bias, labels, weights, coefs)
        split = {} if opts["split"] == "even" else dict(vocab_start=start, vocab_end=end)
        reduce = opts.get("reduce_hidden_grad", True)
        got, got_grads = _run(opts, hidden, weight[start:end], None if bias is None else bias[start:end], labels,
                              weights, coefs, process_group=dist.group.WORLD, reduce_hidden_grad=reduce, **split)
        assert torch.equal(got.num_tokens, want.num_tokens), name
        for field in ("logps", "token_logps") + ALL_EXTRAS:
            if getattr(want, field) is None:
                assert getattr(got, field) is None, (name, field)
            else:
                assert_close(f"{name} {field}", getattr(got, field), getattr(want, field), dtype)
        if opts.get("ties"):
            smallest = labels == 1
            assert bool(smallest.any()) and torch.equal(got.is_top1[smallest], torch.ones_like(got.is_top1[smallest]))
            for other in (V // 2 + 1, V - 1):
                assert not bool(got.is_top1[labels == other].any()), (name, other)
        if want_grads["hidden"] is None:
            assert all(g is None for g in got_grads.values()), name
            continue
        dh = got_grads["hidden"]
        if not reduce:  # each rank holds its slice's share; their sum is the gradient
            dh = dh.clone()
            dist.all_reduce(dh)
        assert_close(f"{name} grad hidden", dh, want_grads["hidden"], dtype)
        assert_close(f"{name} grad weight", got_grads["weight"], want_grads["weight"][start:end], dtype)
        if bias is not None:
            assert_close(f"{name} grad bias", got_grads["bias"], want_grads["bias"][start:end], dtype)


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_single_process(world_size, tmp_path):
    run_ranks(_check_cases, world_size, tmp_path)


def _check_fused_dpo_loss(rank, world):
    import torch.distributed as dist  # noqa: PLC0415

    V, ranges = uneven_ranges(world)
    start, end = ranges[rank]
    g = torch.Generator().manual_seed(1)
    B, T, H = 2, 7, 8
    hidden = torch.randn(2 * B, T, H, generator=g)
    ref_hidden = torch.randn(2 * B, T, H, generator=g)
    weight, ref_weight = torch.randn(V, H, generator=g) / H ** 0.5, torch.randn(V, H, generator=g) / H ** 0.5
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels[B:, -1] = -100  # rejected completions one token shorter: ld_alpha weighs something
    options = dict(shift=True, beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_weighting=True,
                   ld_alpha=0.6, chunk_size=3, backend="cpu")

    def run(w, b, rw, **distributed):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, w, b)]
        out = dk.fused_linear_dpo_loss(*leaves[:2], labels, leaves[2], ref_hidden=ref_hidden, ref_weight=rw,
                                       **options, **distributed)
        return out, torch.autograd.grad(out.loss, leaves)

    want, want_grads = run(weight, bias, ref_weight)
    got, got_grads = run(weight[start:end], bias[start:end], ref_weight[start:end], process_group=dist.group.WORLD,
                         vocab_start=start, vocab_end=end)
    for field in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert_close(field, getattr(got, field), getattr(want, field), torch.float32)
    assert set(got.metrics) == set(want.metrics)
    for key, value in want.metrics.items():
        assert abs(got.metrics[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, got.metrics[key], value)
    assert_close("grad hidden", got_grads[0], want_grads[0], torch.float32)
    assert_close("grad weight", got_grads[1], want_grads[1][start:end], torch.float32)
    assert_close("grad bias", got_grads[2], want_grads[2][start:end], torch.float32)


def test_fused_linear_dpo_loss_matches_single_process(tmp_path):
    run_ranks(_check_fused_dpo_loss, 2, tmp_path)


def _check_communication(rank, world):
    """Bytes put into collectives per call: LAYOUT_INTS int64 (layout), forward_payload_rows(extras)
    fp32 per scored token (forward), N * H fp32 (backward, the hidden gradient): the same for V and 4 V."""
    import torch.distributed as dist  # noqa: PLC0415

    from dpo_kernels.distributed import LAYOUT_INTS, forward_payload_rows  # noqa: PLC0415

    counter = CollectiveBytes()
    S, T, H = 3, 5, 8
    for extras in ((), ALL_EXTRAS, ("entropy", "is_top1")):
        for V_local in (16, 64):
            g = torch.Generator().manual_seed(2)
            hidden = torch.randn(S, T, H, generator=g, requires_grad=True)
            weight = torch.randn(V_local, H, generator=g, requires_grad=True)
            labels = torch.randint(0, V_local * world, (S, T), generator=g)
            labels[0, :2] = -100
            N = int((labels != -100).sum())
            for reduce in (True, False):
                counter.reset()
                with counter.counting():
                    out = dk.linear_sequence_logps(hidden, weight, labels, extras=extras, backend="cpu",
                                                   process_group=dist.group.WORLD, reduce_hidden_grad=reduce)
                    forward = counter.total()
                    out.logps.sum().backward()
                backward = counter.total() - forward
                assert forward == LAYOUT_INTS * 8 + forward_payload_rows(extras) * N * 4, (extras, V_local, forward)
                assert backward == (N * H * 4 if reduce else 0), (extras, V_local, reduce, backward)
                assert {name for name, _ in counter.calls} <= {"all_gather", "all_reduce"}
    assert forward_payload_rows(()) == 3 and forward_payload_rows(ALL_EXTRAS) == 8
    # no gradient wanted for hidden: nothing to reduce
    counter.reset()
    with counter.counting():
        g = torch.Generator().manual_seed(3)
        w = torch.randn(16, H, generator=g, requires_grad=True)
        out = dk.linear_sequence_logps(torch.randn(S, T, H, generator=g), w,
                                       torch.randint(0, 16 * world, (S, T), generator=g), backend="cpu",
                                       process_group=dist.group.WORLD)
        forward = counter.total()
        out.logps.sum().backward()
    assert counter.total() == forward


def test_communication_is_linear_in_tokens_and_independent_of_vocabulary(tmp_path):
    run_ranks(_check_communication, 2, tmp_path)


def _check_layout_errors(rank, world):
    import torch.distributed as dist  # noqa: PLC0415

    group = dist.group.WORLD
    H = 4
    g = torch.Generator().manual_seed(4)  # the same hidden states and labels on every rank
    hidden = torch.randn(2, 3, H, generator=g)
    labels = torch.randint(0, 8, (2, 3), generator=g)

    def call(V_local, **kwargs):
        kwargs.setdefault("backend", "cpu")
        return dk.linear_sequence_logps(hidden, torch.randn(V_local, H), labels, process_group=group, **kwargs)

    with pytest.raises(ValueError, match="same number"):
        dk.linear_sequence_logps(hidden, torch.randn(4 + rank, H), labels, process_group=group, backend="cpu")
    with pytest.raises(ValueError, match="tile"):  # a gap: [0, 4) and [5, 9)
        call(4, vocab_start=5 * rank, vocab_end=5 * rank + 4)
    with pytest.raises(ValueError, match="tile"):  # an overlap: both [0, 4)
        call(4, vocab_start=0, vocab_end=4)
    with pytest.raises(ValueError, match="must be equal"):
        call(3, vocab_start=4 * rank, vocab_end=4 * rank + 4)
    with pytest.raises(ValueError, match="on ranks"):
        call(4, **(dict(vocab_start=0, vocab_end=4) if rank == 0 else {}))
    with pytest.raises(ValueError, match="labels differ"):
        dk.linear_sequence_logps(hidden, torch.randn(4, H), (labels + rank) % 8, process_group=group, backend="cpu")
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        dk.linear_sequence_logps(hidden, torch.randn(4, H), torch.full((2, 3), 8), process_group=group, backend="cpu")
    # local checks: raised on every rank before any collective
    with pytest.raises(ValueError, match="both vocab_start and vocab_end"):
        call(4, vocab_start=0)
    with pytest.raises(ValueError, match="0 <= vocab_start < vocab_end"):
        call(4, vocab_start=4, vocab_end=4)
    with pytest.raises(ValueError, match="backend='reference'"):
        call(4, backend="reference")
    with pytest.raises(TypeError, match="ProcessGroup"):
        dk.linear_sequence_logps(hidden, torch.randn(4, H), labels, process_group="world", backend="cpu")
    with pytest.raises(TypeError, match="reduce_hidden_grad"):
        call(4, reduce_hidden_grad=1)
    # the group is still in step after every error: a valid call works
    out = call(4)
    assert torch.isfinite(out.logps).all()


def test_layout_errors_are_raised_on_every_rank(tmp_path):
    run_ranks(_check_layout_errors, 2, tmp_path)


def test_vocab_range_without_process_group_is_refused():
    hidden, weight, labels = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="vocab_start is given without process_group"):
        dk.linear_sequence_logps(hidden, weight, labels, vocab_start=0)
    with pytest.raises(ValueError, match="vocab_end is given without process_group"):
        dk.linear_sequence_logps(hidden, weight, labels, vocab_end=5)
