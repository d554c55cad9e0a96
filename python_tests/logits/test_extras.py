"""`dk.sequence_logps(..., extras=...)` of every kernel backend against the float64 oracle
(`dk.reference.token_extras` on the very values the kernel saw): entropy, mean_logits, is_top1,
log_sum_sq_probs in forward, and the logits gradient through the token log-probs and the entropy,
at normal and extreme (+-1e4) logits, with masked positions, all-masked rows and rows that span
several kernel chunks, in float64 (CPU), fp32 and bf16. Ties decide is_top1 by argmax's first-index
rule.

Bounds: `RTOL * magnitude` with RTOL 1e-10 for float64 inputs and 2e-5 for fp32 / bf16 (the
kernels accumulate in fp32), where the magnitude is what the quantity is formed from: for the
per-row extras `M = max_v |x_v - max| (over entries with p_v > 0) + log V + 1` (log-probs: plus
`|log p_target|`),
(mean_logits: the mean of |x_v|, plus 1); for the gradient `|grad| + p_v * G * M`, G the size of
the upstream gradients, plus the final rounding of a 16-bit gradient.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.logps import backend_params, require_backend, supports_dtype, tolerance

EXTRAS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


@dataclasses.dataclass(frozen=True)
class ExtrasCase:
    S: int = 3
    T: int = 6
    V: int = 300
    dtype: torch.dtype = torch.float32
    values: str = "normal"  # normal | extreme (+-1e4 offsets per row) | spread (entries at +1e4 and -1e4)
    shift: bool = False
    entropy_grad: bool = True

    @property
    def id(self) -> str:
        return f"{str(self.dtype)[6:]}-V{self.V}-{self.values}" + ("-shift" if self.shift else "") + (
            "" if self.entropy_grad else "-no_entropy_grad")


CASES = [
    ExtrasCase(),
    ExtrasCase(dtype=torch.bfloat16, shift=True),
    ExtrasCase(dtype=torch.float64),
    ExtrasCase(values="extreme"),
    ExtrasCase(values="spread", dtype=torch.bfloat16),
    ExtrasCase(values="extreme", dtype=torch.float64, entropy_grad=False),
    ExtrasCase(S=1, T=3, V=4200),  # several chunks of the CPU kernel (2048), many of the interpreter's
]


def rtol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 2e-5


def make_inputs(case: ExtrasCase):
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    S, T, V = case.S, case.T, case.V
    x = torch.randn(S, T, V, generator=gen, dtype=torch.float64) * 3
    if case.values == "extreme":
        x = x + torch.where(torch.rand(S, T, 1, generator=gen) < 0.5, 1e4, -1e4).double()
    elif case.values == "spread":
        x = x + torch.where(torch.rand(S, T, V, generator=gen) < 0.02, 1e4, -1e4).double()
    labels = torch.randint(0, V, (S, T), generator=gen)
    labels[:, 0] = -100
    if S > 1:
        labels[1] = -100  # an all-masked row
    # ties at the row max (the max is raised so that the tie decides argmax):
    # [0, 1]: the target ties with an earlier entry -> False; [0, 2]: with a later entry -> True
    t = 2 if case.shift else 1
    for pos, first, second, target in ((t, 5, 9, 9), (t + 1, 5, 9, 5)):
        top = x[0, pos].max() + 1
        x[0, pos, first] = top
        x[0, pos, second] = top
        labels[0, pos + 1 if case.shift else pos] = target
    x = x.to(case.dtype)  # the kernels and the oracle see the same (rounded) values
    return x, labels


def run(x, labels, case, backend, *, grad_logps, grad_tokens, grad_entropy, inplace_backward=False):
    leaf = x.detach().clone().requires_grad_()
    inp = leaf * 1 if inplace_backward else leaf
    out = dk.sequence_logps(inp, labels, shift=case.shift, extras=EXTRAS, return_token_logps=True,
                            backend=backend, inplace_backward=inplace_backward)
    acc = out.logps.dtype
    loss = (out.logps * grad_logps.to(acc)).sum() + (out.token_logps * grad_tokens.to(acc)).sum()
    if grad_entropy is not None:
        loss = loss + (out.entropy * grad_entropy.to(acc)).sum()
    (grad,) = torch.autograd.grad(loss, [leaf])
    return out, grad


def assert_within(name, got, want, bound):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs()
    worst = float((err - bound).max())
    assert (err <= bound).all(), f"{name}: max error {float(err.max()):.3e}, worst excess over the bound {worst:.3e}"


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "triton", "cuda", "cuda_emulated")))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_extras_and_gradients_match_float64_oracle(backend, device, case):
    require_backend(backend, device)
    if not supports_dtype(backend, case.dtype):
        pytest.skip(f"float64 is not a dtype of backend {backend!r}")
    x, labels = make_inputs(case)
    gen = torch.Generator().manual_seed(1)
    S, T, V = x.shape
    grads = dict(grad_logps=torch.randn(S, generator=gen, dtype=torch.float64)[:, None],
                 grad_tokens=torch.randn(S, T, generator=gen, dtype=torch.float64),
                 grad_entropy=torch.randn(S, T, generator=gen, dtype=torch.float64) if case.entropy_grad else None)
    got, got_grad = run(x.to(device), labels.to(device), case, backend,
                        **{k: None if v is None else v.to(device) for k, v in grads.items()})
    want, want_grad = run(x.double(), labels, case, "reference", **grads)

    targets = dk.reference.shift_labels(labels) if case.shift else labels
    valid = targets != -100
    x64 = x.double()
    logp = torch.log_softmax(x64, -1)
    p = logp.exp()
    row_max = x64.amax(-1, keepdim=True)
    M = torch.where(p > 0, (x64 - row_max).abs(), torch.zeros_like(x64)).amax(-1) + math.log(V) + 1
    r = rtol(case.dtype)
    assert torch.equal(got.num_tokens.cpu(), want.num_tokens)
    # a token log-prob is formed from x_target - max, however unlikely the target
    M_target = (want.token_logps.detach().abs() + M)
    assert_within("token_logps", got.token_logps, want.token_logps, r * M_target)
    assert_within("entropy", got.entropy, want.entropy, r * M)
    assert_within("log_sum_sq_probs", got.log_sum_sq_probs, want.log_sum_sq_probs, r * M)
    assert_within("mean_logits", got.mean_logits, want.mean_logits, r * (x64.abs().mean(-1) + 1))
    assert got.is_top1.dtype == torch.bool
    assert torch.equal(got.is_top1.cpu(), want.is_top1)
    assert want.is_top1[0].any() and not want.is_top1[0, 2 if case.shift else 1]  # the tie cases are exercised
    for name in EXTRAS:  # masked positions are 0 / False
        assert not getattr(got, name)[~valid.to(device)].any(), name

    g = (grads["grad_logps"] + grads["grad_tokens"]).abs()
    if case.entropy_grad:
        g = g + grads["grad_entropy"].abs() * (M + want.entropy.detach().abs())
    g = torch.where(valid, g, torch.zeros_like(g))
    tol = tolerance(case.dtype, backend)
    bound = r * (want_grad.abs() + p * (g * M)[..., None]) + tol.round_u * want_grad.abs() + tol.floor
    assert_within("grad logits", got_grad, want_grad, bound)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "triton", "cuda", "cuda_emulated")))
def test_extras_do_not_change_log_probs_and_only_requested_are_returned(backend, device):
    require_backend(backend, device)
    x, labels = make_inputs(ExtrasCase(T=4, V=70))
    x, labels = x.to(device), labels.to(device)
    plain = dk.sequence_logps(x, labels, backend=backend, return_token_logps=True)
    some = dk.sequence_logps(x, labels, backend=backend, return_token_logps=True, extras=("is_top1", "entropy"))
    torch.testing.assert_close(some.token_logps, plain.token_logps, rtol=2e-6, atol=2e-6)
    assert plain.entropy is None and plain.is_top1 is None
    assert some.entropy is not None and some.is_top1 is not None
    assert some.mean_logits is None and some.log_sum_sq_probs is None
    assert not some.is_top1.requires_grad


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "triton", "cuda", "cuda_emulated")))
def test_inplace_backward_with_entropy_equals_fresh_buffer(backend, device):
    require_backend(backend, device)
    case = ExtrasCase(T=4, V=70)
    x, labels = make_inputs(case)
    gen = torch.Generator().manual_seed(2)
    grads = dict(grad_logps=torch.randn(case.S, 1, generator=gen), grad_tokens=torch.randn(case.S, case.T, generator=gen),
                 grad_entropy=torch.randn(case.S, case.T, generator=gen))
    grads = {k: v.to(device) for k, v in grads.items()}
    _, fresh = run(x.to(device), labels.to(device), case, backend, **grads)
    _, inplace = run(x.to(device), labels.to(device), case, backend, inplace_backward=True, **grads)
    assert torch.equal(inplace, fresh)


@pytest.mark.parametrize("backend,device", backend_params(("cpu",)))
def test_unbatched_and_compiled_extras(backend, device):
    require_backend(backend, device)
    x, labels = make_inputs(ExtrasCase(S=1, T=5, V=50))
    eager = dk.sequence_logps(x[0], labels[0], backend=backend, extras=EXTRAS)
    assert eager.entropy.shape == (5,) and eager.is_top1.shape == (5,)
    want = dk.reference.token_extras(x[0].double(), labels[0], compute_dtype=torch.float64)
    torch.testing.assert_close(eager.entropy.double(), want["entropy"], rtol=2e-5, atol=2e-5)

    def f(logits, lab):
        out = dk.sequence_logps(logits, lab, backend=backend, extras=EXTRAS)
        return out.logps, out.entropy, out.mean_logits, out.is_top1, out.log_sum_sq_probs

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for got, ref in zip(compiled(x, labels), f(x, labels)):
        assert torch.equal(got, ref)


def test_bad_extras_are_refused_before_any_kernel():
    x, labels = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    with pytest.raises(ValueError, match="extras must be names"):
        dk.sequence_logps(x, labels, extras=("entropy", "perplexity"))
    with pytest.raises(TypeError, match="extras must be a sequence"):
        dk.sequence_logps(x, labels, extras="entropy")
