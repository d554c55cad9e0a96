"""Shared helpers of the `dk.sequence_logps` tests: backend parametrisation, input cases, the float64
reference run, and the error bounds of docs/design.md section 5.

Error bounds. Every comparison is against `dk.reference.sequence_logps(..., compute_dtype=float64)`
run on the very values the backend saw (16-bit inputs upcast exactly to float64), so the only
differences allowed are those of the backend's own arithmetic:

- accumulation (fp32, or float64 for float64 inputs): the kernels form a token log-prob as
  `(x_t - max) - log_sum` and a probability as `exp((x_j - max) - log_sum)`, never through a rounded
  `lse`, so each carries a few units of roundoff times the magnitude of the numbers involved,
  `|x_j - max| + log V + 1` (small for the likely tokens however large the logits are); that is
  `ACC_ROUNDINGS * eps * magnitude`, absolute for log-probs and relative to `p_j` for gradients; the upstream gradient
  of a token log-prob (`a_s w_t / n_s + b_st`, summed by autograd in the same dtype) carries a
  few roundings of `|a_s w_t / n_s| + |b_st|`;
- on top, `rtol` relative (1e-10 for float64 inputs, 1e-5 otherwise: docs/design.md section 5);
- gradients of 16-bit logits are rounded once to the input dtype: `round_u * |grad|`, plus half
  the dtype's smallest subnormal for values that underflow.
Per-sequence sums get the weighted sum of their terms' bounds plus the summation's own error.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import List, Optional, Sequence

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.backends.availability import triton_interpreting, unavailable_reason

# cuda_emulated: the CUDA C++ kernels run on CPU tensors by their host emulation (csrc/cuda/host_emulation/).
ALL_BACKENDS = ("cpu", "triton", "cuda", "reference", "cuda_emulated")
KERNEL_BACKENDS = ("cpu", "triton", "cuda", "cuda_emulated")
FLOAT64_BACKENDS = ("cpu", "reference")
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Roundings of the accumulation dtype allowed per unit of magnitude (see the module docstring).
ACC_ROUNDINGS = 8


# --------------------------------------------------------------------------------------------
# Backends and devices


def backend_params(backends: Sequence[str] = ALL_BACKENDS) -> List:
    """pytest params `(backend, device)`: every backend on the devices it can run on. CUDA ones are
    marked `gpu`; all skip at run time (see `require_backend`) when unusable here."""
    params = []
    for device in ("cpu", "cuda"):
        for name in backends:
            if (name, device) in (("cuda", "cpu"), ("cpu", "cuda"), ("cuda_emulated", "cuda")):
                continue  # never usable: these pairings are covered by the error tests
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


def require_backend(backend: str, device: str) -> None:
    """Skip the calling test, with the library's own reason, when `backend` cannot run on `device`."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")


def supports_dtype(backend: str, dtype: torch.dtype) -> bool:
    return dtype != torch.float64 or backend in FLOAT64_BACKENDS


# --------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration of `dk.sequence_logps`.

    layout: contiguous | big_view (`big[:S, :T, :V]` of a larger tensor) | drop_last
        (`logits[:, :-1]`) | offset_view (`big[1:, 2:, 3:]`: a nonzero storage offset) | transposed (`[T, S, V]` storage seen as `[S, T, V]`) | expanded
        (stride 0 over S; not for in-place backward).
    mask (of the labels): none | prompt | padding | prompt_padding | all_masked_row | random | all.
    values: normal (randn * 3) | extreme (+-1e4) | neginf (rows with -inf entries, finite targets).
    upstream: both (random gradients on logps and token_logps) | logps (token_logps not returned).
    unbatched: 2-D `[N, V]` logits, `[N]` labels (S must be 1).
    """

    S: int
    T: int
    V: int
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    mask: str = "random"
    shift: bool = False
    average: bool = False
    weights: bool = False
    upstream: str = "both"
    unbatched: bool = False
    values: str = "normal"
    ignore_index: int = -100

    def __post_init__(self):
        assert not self.unbatched or self.S == 1
        assert not (self.unbatched and self.layout in ("transposed", "expanded"))
        # an expanded tensor repeats sequence 0's values, whose targets differ from the others'
        assert self.layout != "expanded" or self.values == "normal"

    @property
    def id(self) -> str:
        parts = [f"{self.S}x{self.T}x{self.V}" if not self.unbatched else f"N{self.T}x{self.V}",
                 str(self.dtype).replace("torch.", ""), self.layout, self.mask]
        if self.shift:
            parts.append("shift")
        if self.average:
            parts.append("avg")
        if self.weights:
            parts.append("w")
        if self.upstream != "both":
            parts.append(f"up-{self.upstream}")
        if self.values != "normal":
            parts.append(self.values)
        if self.ignore_index != -100:
            parts.append(f"ign{self.ignore_index}")
        return "-".join(parts)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


@dataclasses.dataclass
class Inputs:
    logits: torch.Tensor  # what the API gets: case.dtype, case.layout, requires grad
    labels: torch.Tensor  # [S, T] (or [N]) int64
    token_weights: Optional[torch.Tensor]  # like labels, float, requires grad
    grad_logps: torch.Tensor  # upstream gradient of logps, [S] (or [1]) fp32
    grad_token_logps: Optional[torch.Tensor]  # upstream gradient of token_logps, like labels, fp32
    base: torch.Tensor  # the tensor that owns the logits' storage


def _labels(case: Case, gen: torch.Generator) -> torch.Tensor:
    S, T, V = case.S, case.T, case.V
    keep = torch.ones(S, T, dtype=torch.bool)
    idx = torch.arange(T)
    if case.mask in ("prompt", "prompt_padding"):
        prompt = torch.randint(0, max(1, T // 2) + 1, (S,), generator=gen)
        keep &= idx[None, :] >= prompt[:, None]
    if case.mask in ("padding", "prompt_padding"):
        pad = torch.randint(0, max(1, T // 3) + 1, (S,), generator=gen)
        keep &= idx[None, :] < (T - pad)[:, None]
    if case.mask == "random":
        keep &= torch.rand(S, T, generator=gen) > 0.3
    if case.mask == "all_masked_row":
        keep &= torch.rand(S, T, generator=gen) > 0.2
        keep[torch.randint(0, S, (1,), generator=gen)] = False
    if case.mask == "all":
        keep[:] = False
    low = 1 if case.ignore_index == 0 else 0
    labels = torch.randint(low, V, (S, T), generator=gen)
    labels = torch.where(keep, labels, torch.full_like(labels, case.ignore_index))
    return labels


def position_targets(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    """[S, T] target of each logits position (labels[:, t + 1] with shift)."""
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)


def _values(case: Case, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[S, T, V] float64 logits, rounded to case.dtype (still float64)."""
    S, T, V = case.S, case.T, case.V
    x = torch.randn(S, T, V, generator=gen, dtype=torch.float64) * 3
    if case.values == "extreme":
        signs = torch.where(torch.rand(S, T, V, generator=gen) < 0.5, -1.0, 1.0).double()
        near_ties = signs * 1e4 + torch.randn(S, T, V, generator=gen, dtype=torch.float64) * 4
        spread = torch.randn(S, T, V, generator=gen, dtype=torch.float64) * 1e4
        row_kind = (torch.arange(S * T).reshape(S, T) % 2 == 0)[..., None]
        x = torch.where(row_kind, near_ties, spread).clamp(-1.2e4, 1.2e4)  # fp16-representable
    elif case.values == "neginf":
        drop = torch.rand(S, T, V, generator=gen) < 0.4
        rows = (torch.arange(S * T).reshape(S, T) % 2 == 0)[..., None]
        x = torch.where(drop & rows, torch.full_like(x, -math.inf), x)
        x[0, 0, :] = -math.inf  # -inf everywhere but at its target (when the position is unmasked)
        # every unmasked position's target logit is finite
        valid = targets != case.ignore_index
        s_idx, t_idx = valid.nonzero(as_tuple=True)
        x[s_idx, t_idx, targets[s_idx, t_idx]] = torch.randn(len(s_idx), generator=gen, dtype=torch.float64) * 3
        # No row is -inf everywhere, a masked one included: the reference's gradient of such a row
        # is NaN (log_softmax of it is), even where the position is masked.
        dead = torch.isinf(x).all(dim=-1)
        x[..., 0] = torch.where(dead, torch.zeros_like(x[..., 0]), x[..., 0])
    return x.to(case.dtype).to(torch.float64)


def _place(x: torch.Tensor, case: Case, gen: torch.Generator):
    """(logits view in case.layout holding `x`, base tensor owning its storage)."""
    S, T, V = case.S, case.T, case.V
    dtype = case.dtype
    if case.unbatched:
        x = x[0]
        if case.layout == "contiguous":
            base = x.clone()
            return base, base
        if case.layout == "big_view":
            base = torch.randn(T + 2, V + 5, generator=gen).to(dtype)
            base[:T, :V] = x
            return base[:T, :V], base
        if case.layout == "drop_last":
            base = torch.randn(T + 1, V, generator=gen).to(dtype)
            base[:T] = x
            return base[:-1], base
        if case.layout == "offset_view":
            base = torch.randn(T + 1, V + 3, generator=gen).to(dtype)
            base[1:, 3:] = x
            return base[1:, 3:], base
        raise ValueError(case.layout)
    if case.layout == "contiguous":
        base = x.clone()
        return base, base
    if case.layout == "big_view":
        base = torch.randn(S + 1, T + 2, V + 5, generator=gen).to(dtype)
        base[:S, :T, :V] = x
        return base[:S, :T, :V], base
    if case.layout == "drop_last":
        base = torch.randn(S, T + 1, V, generator=gen).to(dtype)
        base[:, :T] = x
        return base[:, :-1], base
    if case.layout == "offset_view":
        base = torch.randn(S + 1, T + 2, V + 3, generator=gen).to(dtype)
        base[1:, 2:, 3:] = x
        return base[1:, 2:, 3:], base
    if case.layout == "transposed":
        base = torch.empty(T, S, V, dtype=dtype)
        view = base.transpose(0, 1)
        view.copy_(x)
        return view, base
    if case.layout == "expanded":
        base = x[:1].clone()
        return base.expand(S, T, V), base
    raise ValueError(case.layout)


def make_inputs(case: Case, device: str = "cpu") -> Inputs:
    gen = torch.Generator().manual_seed(case.seed)
    labels = _labels(case, gen)
    targets = position_targets(labels, case.shift, case.ignore_index)
    x = _values(case, targets, gen)
    if case.layout == "expanded":
        x = x[:1].expand_as(x).clone()
    x = x.to(case.dtype)
    logits, base = _place(x, case, gen)
    assert torch.equal(logits.to(torch.float64), (x[0] if case.unbatched else x).to(torch.float64))
    weights = None
    if case.weights:
        wdtype = torch.float64 if case.dtype == torch.float64 else torch.float32
        weights = (torch.rand(case.S, case.T, generator=gen) * 2 - 0.5).to(wdtype)
    grad_logps = torch.randn(case.S, generator=gen)
    grad_token = torch.randn(case.S, case.T, generator=gen) if case.upstream == "both" else None
    if case.unbatched:
        labels = labels[0]
        weights = None if weights is None else weights[0]
        grad_token = None if grad_token is None else grad_token[0]

    base = base.to(device)
    if case.layout == "expanded":
        base.requires_grad_()
        logits = base.expand(case.S, case.T, case.V)
    else:
        logits = _view_like(base, logits, case)
        logits.requires_grad_()
    if weights is not None:
        weights = weights.to(device).requires_grad_()
    return Inputs(
        logits=logits,
        labels=labels.to(device),
        token_weights=weights,
        grad_logps=grad_logps.to(device),
        grad_token_logps=None if grad_token is None else grad_token.to(device),
        base=base,
    )


def _view_like(base: torch.Tensor, view: torch.Tensor, case: Case) -> torch.Tensor:
    """The same view as `view` (of the CPU base), taken on `base` (possibly moved to CUDA)."""
    if base.device == view.device and base.untyped_storage().data_ptr() == view.untyped_storage().data_ptr():
        return view
    offset = view.storage_offset()
    return base.as_strided(view.shape, view.stride(), offset)


# --------------------------------------------------------------------------------------------
# Running a backend and the reference


@dataclasses.dataclass
class Result:
    """Outputs and gradients, always batched (`[S]`, `[S, T]`, `[S, T, V]`)."""

    logps: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: Optional[torch.Tensor]
    grad_logits: torch.Tensor
    grad_weights: Optional[torch.Tensor]
    raw: object = None  # the LogpsOutput (or ReferenceLogps) as returned


def _batched(t: Optional[torch.Tensor], unbatched: bool) -> Optional[torch.Tensor]:
    """`t` with the sequence dimension of a 2-D (unbatched) call restored."""
    return t.unsqueeze(0) if t is not None and unbatched else t


def _loss(logps, token_logps, inputs: Inputs):
    loss = (logps * inputs.grad_logps.to(logps.dtype)).sum()
    if inputs.grad_token_logps is not None:
        loss = loss + (token_logps * inputs.grad_token_logps.to(token_logps.dtype)).sum()
    return loss


def run_backend(case: Case, inputs: Inputs, backend: str, *, inplace_backward: bool = False) -> Result:
    out = dk.sequence_logps(
        inputs.logits, inputs.labels, ignore_index=case.ignore_index, shift=case.shift, average=case.average,
        token_weights=inputs.token_weights, return_token_logps=case.upstream == "both",
        inplace_backward=inplace_backward, backend=backend,
    )
    wrt = [inputs.logits] + ([inputs.token_weights] if inputs.token_weights is not None else [])
    grads = torch.autograd.grad(_loss(out.logps, out.token_logps, inputs), wrt)
    unb = case.unbatched
    return Result(
        logps=out.logps,
        num_tokens=out.num_tokens,
        token_logps=_batched(out.token_logps, unb),
        grad_logits=_batched(grads[0], unb),
        grad_weights=None if len(grads) == 1 else _batched(grads[1], unb),
        raw=out,
    )


def run_reference(case: Case, inputs: Inputs) -> Result:
    """The float64 oracle on the same (rounded) values, with the same upstream gradients."""
    x64 = inputs.logits.detach().to(torch.float64).clone().requires_grad_()
    w64 = None
    if inputs.token_weights is not None:
        w64 = inputs.token_weights.detach().to(torch.float64).clone().requires_grad_()
    ref = dk.reference.sequence_logps(
        x64, inputs.labels, ignore_index=case.ignore_index, shift=case.shift, average=case.average,
        token_weights=w64, compute_dtype=torch.float64,
    )
    loss = (ref.logps * inputs.grad_logps.double()).sum()
    if inputs.grad_token_logps is not None:
        loss = loss + (ref.token_logps * inputs.grad_token_logps.double()).sum()
    grads = torch.autograd.grad(loss, [x64] + ([w64] if w64 is not None else []))
    unb = case.unbatched
    return Result(
        logps=ref.logps.detach(),
        num_tokens=ref.num_tokens,
        token_logps=_batched(ref.token_logps.detach(), unb),
        grad_logits=_batched(grads[0], unb),
        grad_weights=None if len(grads) == 1 else _batched(grads[1], unb),
        raw=ref,
    )


# --------------------------------------------------------------------------------------------
# Error bounds


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative tolerance (docs/design.md, section 5)
    eps: float  # unit roundoff of the accumulation dtype
    round_u: float  # unit roundoff of the one rounding of gradients to the input dtype
    floor: float  # half the smallest subnormal of the gradient dtype (underflow)


_FP32_EPS = 2.0 ** -24


def tolerance(dtype: torch.dtype, backend: str = "cpu") -> Tolerance:
    if dtype == torch.float64:
        return Tolerance(rtol=1e-10, eps=2.0 ** -53, round_u=0.0, floor=2.0 ** -1075)
    if dtype == torch.float32:
        return Tolerance(rtol=1e-5, eps=_FP32_EPS, round_u=0.0, floor=2.0 ** -150)
    if dtype == torch.bfloat16:
        round_u = 2.0 ** -8
        if backend == "triton" and triton_interpreting():
            # Triton's interpreter converts fp32 -> bf16 by truncating the mantissa (triton 3.x,
            # runtime/interpreter.py: cast_impl -> _convert_float with no rounding mode): an error of
            # up to one bf16 ulp (2^-7 relative) instead of half of one. Compiled Triton rounds to
            # nearest even, and the GPU run of this test keeps the 2^-8 bound.
            round_u = 2.0 ** -7
        return Tolerance(rtol=1e-5, eps=_FP32_EPS, round_u=round_u, floor=2.0 ** -134)
    if dtype == torch.float16:
        return Tolerance(rtol=1e-5, eps=_FP32_EPS, round_u=2.0 ** -11, floor=2.0 ** -25)
    raise ValueError(dtype)


def element_magnitude(x64: torch.Tensor) -> torch.Tensor:
    """[S, T, V]: |x_j - max| + log V + 1 (0 distance for non-finite entries), the size of the numbers
    from which a kernel forms the log-prob or the probability of entry j."""
    finite = torch.isfinite(x64)
    row_max = torch.where(finite, x64, torch.full_like(x64, -math.inf)).amax(dim=-1, keepdim=True)
    distance = torch.where(finite, (x64 - row_max).abs(), torch.zeros_like(x64))
    return distance + math.log(x64.shape[-1]) + 1


def upstream_per_position(case: Case, inputs: Inputs, valid: torch.Tensor):
    """[S, T] float64: d loss / d token_logps[s, t] (what multiplies `onehot - p` in the gradient),
    and the sum of the magnitudes of its terms (`|a_s w_t / n_s| + |b_st|`): autograd adds the two
    contributions in the accumulation dtype, so `g` itself carries an error of a few roundings of
    that sum, which cancellation can make large relative to `g`."""
    a = inputs.grad_logps.double().reshape(case.S, 1)
    S, T = valid.shape
    w = torch.ones(S, T, dtype=torch.float64, device=valid.device)
    if inputs.token_weights is not None:
        w_lab = inputs.token_weights.detach().double().reshape(S, T)
        w = position_targets(w_lab, case.shift, 0)
    g = a * w
    if case.average:
        g = g / valid.sum(1, keepdim=True).clamp(min=1).double()
    magnitude = g.abs()
    if inputs.grad_token_logps is not None:
        b = inputs.grad_token_logps.double().reshape(S, T)
        g = g + b
        magnitude = magnitude + b.abs()
    zero = torch.zeros_like(g)
    return torch.where(valid, g, zero), torch.where(valid, magnitude, zero)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    actual64 = actual.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite_expected = torch.isfinite(expected)
    assert torch.isfinite(actual64[finite_expected]).all(), f"{what}: non-finite values where the reference is finite"
    err = (actual64 - expected).abs()
    err = torch.where(finite_expected, err, torch.zeros_like(err))
    ratio = err / bound
    worst = int(ratio.argmax())
    if float(ratio.flatten()[worst]) > 1.0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
        raise AssertionError(
            f"{what}: error {float(err.flatten()[worst]):.3e} at {list(idx)} exceeds the bound "
            f"{float(bound.flatten()[worst]):.3e} (actual {float(actual64.flatten()[worst])!r}, "
            f"expected {float(expected.flatten()[worst])!r}); {int((ratio > 1).sum())} of {ratio.numel()} out of bound"
        )


def check_against_reference(case: Case, inputs: Inputs, got: Result, ref: Result, backend: str) -> None:
    """Forward values, counts, masks and gradients of `got` against the float64 reference."""
    tol = tolerance(case.dtype, backend)
    x64 = inputs.logits.detach().to(torch.float64)
    if case.unbatched:
        x64 = x64.unsqueeze(0)
    labels = inputs.labels.reshape(case.S, case.T)
    targets = position_targets(labels, case.shift, case.ignore_index)
    valid = targets != case.ignore_index
    n = valid.sum(1)
    mag_el = element_magnitude(x64)
    acc_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32

    # Output structure
    assert got.logps.dtype == acc_dtype and got.logps.shape == (case.S,)
    assert got.num_tokens.dtype == torch.int64 and torch.equal(got.num_tokens.cpu(), ref.num_tokens.cpu())
    assert torch.equal(got.num_tokens.cpu(), n.cpu())
    assert got.logps.device == inputs.logits.device
    if case.upstream == "both":
        expect_shape = (case.T,) if case.unbatched else (case.S, case.T)
        assert got.raw.token_logps.shape == expect_shape and got.token_logps.dtype == acc_dtype
    else:
        assert got.raw.token_logps is None
    # the linear path's extras are never filled by the logits path
    extras = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    assert all(getattr(got.raw, name) is None for name in extras)

    # Token log-probs: within bound, exactly 0 where masked
    mag = mag_el.gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)
    token_bound = tol.rtol * ref.token_logps.abs() + ACC_ROUNDINGS * tol.eps * mag
    if got.token_logps is not None:
        assert_within(got.token_logps, ref.token_logps, token_bound, "token_logps")
        assert (got.token_logps.detach()[~valid] == 0).all(), "token_logps must be exactly 0 at masked positions"

    # Sequence log-probs: the bound of a (weighted) sum of bounded terms, plus its own rounding
    w_pos = torch.ones_like(ref.token_logps)
    if inputs.token_weights is not None:
        w_pos = position_targets(inputs.token_weights.detach().double().reshape(case.S, case.T), case.shift, 0)
    w_pos = torch.where(valid, w_pos.abs(), torch.zeros_like(w_pos))
    terms = w_pos * ref.token_logps.abs()
    seq_bound = (w_pos * token_bound).sum(1) + (case.T + 2) * tol.eps * terms.sum(1)
    if case.average:
        seq_bound = seq_bound / n.clamp(min=1).double()
    seq_bound = seq_bound + tol.rtol * ref.logps.abs() + 1e-300
    assert_within(got.logps, ref.logps, seq_bound, "logps")
    empty = n == 0
    assert (got.logps.detach()[empty] == 0).all(), "an all-masked row must have logps == 0"

    # Gradient w.r.t. the logits: g * (onehot - p), one rounding to the input dtype
    assert got.grad_logits.dtype == case.dtype and got.grad_logits.shape == ref.grad_logits.shape
    _, g_mag = upstream_per_position(case, inputs, valid)
    g_mag = g_mag[..., None]
    p = torch.softmax(torch.where(valid[..., None], x64, torch.zeros_like(x64)), dim=-1)
    onehot = torch.zeros_like(p).scatter_(-1, torch.where(valid, targets, 0)[..., None], 1.0)
    grad_bound = ((tol.rtol + tol.round_u) * ref.grad_logits.abs()
                  + ACC_ROUNDINGS * tol.eps * g_mag * (mag_el * p + onehot)
                  + 2.0 ** -120 * g_mag + tol.floor)
    assert_within(got.grad_logits, ref.grad_logits, grad_bound, "grad logits")
    assert (got.grad_logits.detach()[~valid] == 0).all(), "masked positions must get an exactly zero gradient"

    # Gradient w.r.t. token_weights: a_s * token_logp / n_s at the label's index
    if inputs.token_weights is not None:
        assert got.grad_weights.dtype == inputs.token_weights.dtype
        a = inputs.grad_logps.double().abs().reshape(case.S, 1)
        scale = a / (n.clamp(min=1).double()[:, None] if case.average else 1.0)
        w_bound = (tol.rtol + (0 if got.grad_weights.dtype == torch.float64 else _FP32_EPS)) \
            * ref.grad_weights.abs() + scale * ACC_ROUNDINGS * tol.eps * mag.amax(1, keepdim=True) + 1e-300
        assert_within(got.grad_weights, ref.grad_weights, w_bound, "grad token_weights")
