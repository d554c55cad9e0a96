"""Shared helpers of the linear-path tests: input cases, the float64 reference run with the
gradient w.r.t. the full logits, and error bounds.

Error bounds. The reference runs in float64 on the very values the backend saw (16-bit inputs
upcast exactly). A backend's differences come from (a) the GEMMs (fp32, or the 16-bit compute dtype
with fp32 accumulation and one rounding of the output tile), (b) the epilogues' fp32 arithmetic, (c)
the gradient GEMMs and the final rounding of gradients to the input dtype. All are relative errors
of size `u` (1e-5 for fp32 per docs/design.md section 5; 1e-10 for float64; the dtype's unit roundoff 2^-8
for bf16, 2^-11 for fp16, since a 16-bit tile rounds every logit once) times the magnitude of what
is summed, so each quantity is checked against `BOUND_FACTOR * u * magnitude` with

- E_t = k * max_v (|h_t| . |W_v| + |b_v|) + log V + 1, the magnitude of token t's logits
  (k = logit_scale / temperature), which bounds a logit's error and so a log-prob's;
- D_tv = |dy_tv| + G_t * p_tv * E_t for the gradient w.r.t. the GEMM output `y` (G_t the size of the
  upstream gradients of token t), whose error a logit error moves by p_tv times it;
- gradients: D @ |W| (hidden), D^T @ |h| (weight), sum_t D (bias).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Optional

import torch

import dpo_kernels as dk

BOUND_FACTOR = 4
EXTRA_NAMES = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def unit_error(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]


@dataclasses.dataclass(frozen=True)
class LinearCase:
    S: int = 3
    T: int = 7
    H: int = 24
    V: int = 70
    dtype: torch.dtype = torch.float32
    chunk_size: Optional[int] = 32
    bias: bool = False
    shift: bool = False
    average: bool = False
    weights: bool = False
    mask: str = "prompt"  # none | prompt | all_masked_row | all
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    extras: tuple = ()
    entropy_grad: bool = False
    grad_on: tuple = ("hidden", "weight", "bias")
    cache: bool = False
    unbatched: bool = False

    @property
    def id(self) -> str:
        parts = [f"{self.S}x{self.T}x{self.H}x{self.V}", str(self.dtype).replace("torch.", ""), f"c{self.chunk_size}",
                 self.mask]
        for flag in ("bias", "shift", "average", "weights", "cache", "unbatched", "entropy_grad"):
            if getattr(self, flag):
                parts.append(flag)
        if (self.temperature, self.logit_scale, self.softcap) != (1.0, 1.0, None):
            parts.append(f"t{self.temperature}-s{self.logit_scale}-cap{self.softcap}")
        if self.extras:
            parts.append("x-" + "+".join(e[:4] for e in self.extras))
        if self.grad_on != ("hidden", "weight", "bias"):
            parts.append("grad-" + "+".join(self.grad_on))
        return "-".join(parts)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


@dataclasses.dataclass
class LinearInputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    token_weights: Optional[torch.Tensor]
    grad_logps: torch.Tensor
    grad_token_logps: torch.Tensor
    grad_entropy: Optional[torch.Tensor]


def make_linear_inputs(case: LinearCase, device: str = "cpu") -> LinearInputs:
    gen = torch.Generator().manual_seed(case.seed)
    S, T, H, V = case.S, case.T, case.H, case.V

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(case.dtype)

    hidden = rand(S, T, H)
    weight = rand(V, H, scale=2.0 / math.sqrt(H))
    bias = rand(V) if case.bias else None
    labels = torch.randint(0, V, (S, T), generator=gen)
    keep = torch.ones(S, T, dtype=torch.bool)
    if case.mask in ("prompt", "all_masked_row"):
        prompt = torch.randint(0, T // 2 + 1, (S,), generator=gen)
        keep &= torch.arange(T)[None, :] >= prompt[:, None]
    if case.mask == "all_masked_row":
        keep[S // 2] = False
    if case.mask == "all":
        keep[:] = False
    labels = torch.where(keep, labels, torch.full_like(labels, -100))
    weights = (torch.rand(S, T, generator=gen, dtype=torch.float64) * 2).to(
        torch.float64 if case.dtype == torch.float64 else torch.float32) if case.weights else None
    grads = (torch.randn(S, generator=gen, dtype=torch.float64), torch.randn(S, T, generator=gen, dtype=torch.float64),
             torch.randn(S, T, generator=gen, dtype=torch.float64) if case.entropy_grad else None)
    if case.unbatched:
        assert S == 1
        hidden, labels = hidden[0], labels[0]
        weights = None if weights is None else weights[0]
        grads = (grads[0], grads[1][0], None if grads[2] is None else grads[2][0])

    def leaf(t, name):
        if t is None:
            return None
        t = t.to(device)
        return t.requires_grad_() if name in case.grad_on else t

    return LinearInputs(
        hidden=leaf(hidden, "hidden"), weight=leaf(weight, "weight"), bias=leaf(bias, "bias"),
        labels=labels.to(device), token_weights=None if weights is None else weights.to(device).requires_grad_(),
        grad_logps=grads[0].to(device), grad_token_logps=grads[1].to(device),
        grad_entropy=None if grads[2] is None else grads[2].to(device),
    )


def _kwargs(case: LinearCase, extras):
    return dict(shift=case.shift, average=case.average, temperature=case.temperature, logit_scale=case.logit_scale,
                softcap=case.softcap)


def _loss(out, inputs: LinearInputs, dtype):
    loss = (out.logps * inputs.grad_logps.to(dtype)).sum() + (out.token_logps * inputs.grad_token_logps.to(dtype)).sum()
    if inputs.grad_entropy is not None:
        loss = loss + (out.entropy * inputs.grad_entropy.to(dtype)).sum()
    return loss


def _wrt(inputs: LinearInputs, case: LinearCase):
    names = [n for n in ("hidden", "weight", "bias") if n in case.grad_on and getattr(inputs, n) is not None]
    if inputs.token_weights is not None:
        names.append("token_weights")
    return names


def run_linear_backend(case: LinearCase, inputs: LinearInputs, backend: str, **overrides):
    extras = tuple(sorted(set(case.extras) | ({"entropy"} if case.entropy_grad else set())))
    out = dk.linear_sequence_logps(
        inputs.hidden, inputs.weight, inputs.labels, inputs.bias, token_weights=inputs.token_weights,
        extras=extras, return_token_logps=True, chunk_size=case.chunk_size,
        cache_budget_bytes=(1 << 40) if case.cache else 0, backend=backend, **_kwargs(case, extras), **overrides,
    )
    names = _wrt(inputs, case)
    grads = torch.autograd.grad(_loss(out, inputs, out.logps.dtype), [getattr(inputs, n) for n in names])
    return out, dict(zip(names, grads))


def run_linear_reference(case: LinearCase, inputs: LinearInputs):
    """float64 reference outputs, gradients, and what the bounds need (p, dy, E)."""
    def f64(t):
        return None if t is None else t.detach().to(torch.float64).requires_grad_()

    h, w, b, tw = f64(inputs.hidden), f64(inputs.weight), f64(inputs.bias), f64(inputs.token_weights)
    hb = h if h.dim() == 3 else h.unsqueeze(0)
    labels = inputs.labels if inputs.labels.dim() == 2 else inputs.labels.unsqueeze(0)
    twb = None if tw is None else (tw if tw.dim() == 2 else tw.unsqueeze(0))
    y = hb @ w.T + (b if b is not None else 0)
    y.retain_grad()
    z = y * case.logit_scale
    if case.softcap is not None:
        z = torch.tanh(z / case.softcap) * case.softcap
    z = z / case.temperature
    ref = dk.reference.sequence_logps(z, labels, shift=case.shift, average=case.average, token_weights=twb,
                                      compute_dtype=torch.float64)
    logp_all = torch.log_softmax(z, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    targets = dk.reference.shift_labels(labels) if case.shift else labels
    valid = targets != -100
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))

    class Out:
        pass

    out = Out()
    out.logps, out.token_logps, out.entropy = ref.logps, ref.token_logps, entropy
    gl = inputs.grad_logps.double()
    gt = inputs.grad_token_logps.double() if inputs.grad_token_logps.dim() == 2 else inputs.grad_token_logps.double()[None]
    ge = None if inputs.grad_entropy is None else (
        inputs.grad_entropy.double() if inputs.grad_entropy.dim() == 2 else inputs.grad_entropy.double()[None])
    loss = (ref.logps * gl).sum() + (ref.token_logps * gt).sum()
    if ge is not None:
        loss = loss + (entropy * ge).sum()
    names = _wrt(inputs, case)
    leaves = {"hidden": h, "weight": w, "bias": b, "token_weights": tw}
    grads = torch.autograd.grad(loss, [leaves[n] for n in names] + [y])
    dy = grads[-1]

    # magnitudes for the bounds
    k = case.logit_scale / case.temperature
    A = hb.detach().abs() @ w.detach().abs().T + (b.detach().abs() if b is not None else 0)
    E = k * A.amax(-1) + math.log(case.V) + 1  # [S, T]
    p = logp_all.detach().exp()
    n = ref.num_tokens.clamp(min=1).double()[:, None] if case.average else 1.0
    w_tok = twb.detach().abs() if twb is not None else 1.0
    G = (gl.abs()[:, None] * w_tok / n + gt.abs())
    if ge is not None:
        G = G + ge.abs() * (E + entropy.detach().abs())
    D = dy.abs() + (G * E)[..., None] * p
    D = torch.where(valid[..., None], D, torch.zeros_like(D))
    mags = {
        "token_logps": E, "entropy": E * (1 + entropy.detach().abs()),
        "logps": (E * w_tok * valid).sum(-1) / (n[:, 0] if case.average else 1.0),
        "hidden": D @ w.detach().abs(), "weight": torch.einsum("stv,sth->vh", D, hb.detach().abs()),
        "bias": D.sum((0, 1)),
        "token_weights": (E + ref.token_logps.detach().abs()) * gl.abs()[:, None] / n,
    }
    ref_extras = dk.reference.linear_sequence_logps(
        h.detach(), w.detach(), inputs.labels, None if b is None else b.detach(), shift=case.shift,
        temperature=case.temperature, logit_scale=case.logit_scale, softcap=case.softcap,
        compute_dtype=torch.float64)
    return out, dict(zip(names, grads[:-1])), mags, ref_extras, E


def assert_within(name, got, expected, magnitude, dtype, factor=BOUND_FACTOR):
    got, expected = got.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu()
    magnitude = torch.as_tensor(magnitude, dtype=torch.float64).cpu()
    got = got.reshape(expected.shape)
    if magnitude.numel() == expected.numel():
        magnitude = magnitude.reshape(expected.shape)
    bound = factor * unit_error(dtype) * magnitude.expand_as(expected)
    if dtype in (torch.bfloat16, torch.float16):
        bound = bound + unit_error(dtype) * expected.abs()  # the final rounding to the input dtype
    err = (got - expected).abs()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert (err <= bound).all(), f"{name}: max error {err.max().item():.3e}, worst excess {(err - bound).max().item():.3e}"
