"""What every benchmarked row must agree with: a float64 oracle on the very inputs the row saw, and
tolerances derived from the dtypes. A row whose outputs fall outside them fails its benchmark.

The oracle is the plain computation (`log_softmax`, target gather, masked per-sequence sum; for the
linear path the logits `hidden @ weight.T` first) in float64, formed block by block over tokens: it
never holds a float64 copy of all the logits. Its gradients are the closed form of that computation
(`d logp_t / d z_tj = onehot - p_tj`), which the reference row, differentiated by autograd, confirms
in every run.

Error model, per scored token t with logits z_t (float64), target y, probabilities p_t:

- `m_z(t) = |z_ty| + sum_j p_tj |z_tj|`: a relative error `u_z` in every logit moves the target term
  by at most `u_z |z_ty|` and the log-sum-exp by at most `u_z sum_j p_tj |z_tj|`. `u_z` is the
  rounding of the logits an implementation computes from `hidden @ weight.T` in the input dtype
  (2^-8 bf16, 2^-11 fp16, fp32: U_ACC); 0 on the logits path, whose logits are given;
- `m(t) = m_z(t) + log V + 1`: the magnitude of the fp32 arithmetic that forms the log-probability
  (all implementations accumulate in fp32), with relative error U_ACC = 1e-5 (docs/design.md, section 5);
- so the token's log-prob error is at most `a_t = u_z m_z(t) + U_ACC m(t)`, and a probability's
  relative error at most `r_tj = u_z (|z_tj| + m_z(t)) + U_ACC (|z_tj| + m(t))`;
- the gradient w.r.t. a logit, `dz_tj = c_t (onehot - p_tj)` (`c_t` the upstream gradient of the
  token's log-prob), is off by at most `A_tj = |c_t| p_tj r_tj + (u_z + U_ACC) |dz_tj|` (the second
  term: `dz` rounded to the GEMM dtype, and the GEMM's own accumulation);
- sums over tokens (per-sequence log-probs, the loss) and over the vocabulary or tokens (the
  gradient GEMMs) add errors of different tokens or logits, which are independent and zero-mean
  roundings: by Hoeffding's inequality `|sum_i w_i e_i| <= k sqrt(sum_i w_i^2 a_i^2)` fails with
  probability at most `2 exp(-k^2 / 2)` when `|e_i| <= a_i`; k is chosen per compared tensor so that
  a correct row fails anywhere in it with probability below FALSE_FAILURE (union bound over its
  entries: k = 5.4 for one number, 8.4 for 10^9 entries). A systematic
  part that need not cancel (fp32 summation, the loss's own arithmetic) is added in the worst case,
  ACC_ROUNDINGS fp32 roundings of the magnitudes summed;
- on the linear path `c_t` is the loss's gradient at the implementation's own log-probs, which may be
  off by their bound: through the loss's Hessian (float64, autograd) that moves all the token
  gradients of a sequence together, so it is added in the worst case (`|dc_t| |d logp_t / d h_t|`
  for the hidden states, `sum_t |dc_t| |onehot - p_tj| |h_t|` for the weight);
- outputs are rounded once to their dtype: `u_out |expected|`, plus the rounding of values that
  fall below the dtype's smallest normal number.

A wrong kernel's error is systematic, not a rounding: skipping a vocabulary chunk of 256 of 32000
moves every token's log-prob by about 8e-3 (50 times the fp32 `a_t`), so a sequence of n tokens by n
times that, while the bound on the sum grows with sqrt(n); zeroed or misplaced gradients fail entry
by entry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

FALSE_FAILURE = 1e-6
ACC_ROUNDINGS = 8
U_ACC = 1e-5
EPS32 = 2.0 ** -24
IGNORE_INDEX = -100


def sigmas(entries: int) -> float:
    """Hoeffding's k for a tensor of `entries` sums: `2 entries exp(-k^2 / 2) = FALSE_FAILURE`."""
    return math.sqrt(2 * math.log(2 * max(entries, 1) / FALSE_FAILURE))


def unit_roundoff(dtype: torch.dtype) -> float:
    """Relative error of one rounding to `dtype` (round to nearest)."""
    return {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
            torch.float16: 2.0 ** -11}[dtype]


def logit_rounding(dtype: torch.dtype) -> float:
    """`u_z` of the linear path: GEMM outputs in `dtype` (fp32: its accumulation, U_ACC)."""
    return U_ACC if dtype in (torch.float32, torch.float64) else unit_roundoff(dtype)


def _block_rows(V: int, device: torch.device) -> int:
    """Token rows per oracle block: a few float64 `[rows, V]` temporaries of 64 MiB (CPU) or 1 GiB."""
    budget = (1 << 30) if device.type == "cuda" else (64 << 20)
    return max(1, budget // (8 * V))


@dataclasses.dataclass
class _TokenTerms:
    logp: torch.Tensor  # [n] float64
    a: torch.Tensor  # [n] bound on logp's error
    m: torch.Tensor  # [n] magnitude of its fp32 arithmetic
    U: Optional[torch.Tensor] = None  # [n, V] d logp_t / d z_tj = onehot - p_tj
    A: Optional[torch.Tensor] = None  # [n, V] bound on the error of dz_tj = c_t U_tj


def _token_terms(z: torch.Tensor, targets: torch.Tensor, c: Optional[torch.Tensor], u_z: float) -> _TokenTerms:
    """Oracle terms of a block of float64 logits `z` `[n, V]` with valid `targets` `[n]`; gradient terms
    when the upstream gradients `c` `[n]` are given."""
    V = z.shape[-1]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    z_target = z.gather(1, targets[:, None])
    logp = (z_target - lse)[:, 0]
    abs_z = z.abs()
    m_z = z_target[:, 0].abs() + (p * abs_z).sum(-1)
    m = m_z + math.log(V) + 1
    terms = _TokenTerms(logp=logp, a=u_z * m_z + U_ACC * m, m=m)
    if c is not None:
        U = -p
        U.scatter_add_(1, targets[:, None], torch.ones_like(U[:, :1]))
        rel = abs_z.mul_(u_z + U_ACC).add_((u_z * m_z + U_ACC * m)[:, None])  # r_tj; abs_z is not needed again
        terms.U = U
        terms.A = rel.mul_(p).add_(U.abs().mul_(u_z + U_ACC)).mul_(c.abs()[:, None])
    return terms


def _fail(name: str, what: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    excess = ((got - want).abs() - bound)
    if bool((excess > 0).any()) or not bool(torch.isfinite(got).all()):
        i = int(torch.nan_to_num(excess, nan=math.inf).flatten().argmax())
        raise AssertionError(
            f"{name}: {what}: outside the error bound around the float64 oracle at {int((excess > 0).sum())}"
            f" of {excess.numel()} entries; worst: got {got.flatten()[i].item():.8g}, oracle "
            f"{want.flatten()[i].item():.8g}, bound {bound.flatten()[i].item():.3g}")


def _output_floor(dtype: torch.dtype) -> float:
    return 2 * torch.finfo(dtype).smallest_normal * unit_roundoff(dtype)


# --------------------------------------------------------------------------------------------
# Logits path: per-sequence log-probs of given logits, and their gradient


def check_logits_path(name: str, logits: torch.Tensor, labels: torch.Tensor, upstream: torch.Tensor,
                      logps: torch.Tensor, grad: Optional[torch.Tensor] = None) -> None:
    """Raises AssertionError unless `logps` `[S]` (and `grad`, the gradient of `sum(upstream * logps)`
    w.r.t. `logits` `[S, T, V]`) agree with the float64 oracle. Compares the gradient block by block."""
    S, T, V = logits.shape
    flat, targets = logits.detach().reshape(S * T, V), labels.reshape(S * T)
    seq = torch.arange(S, device=logits.device).repeat_interleave(T)
    want = torch.zeros(S, dtype=torch.float64, device=logits.device)
    var = torch.zeros_like(want)
    systematic = torch.zeros_like(want)
    u_out = unit_roundoff(logits.dtype)
    rows = _block_rows(V, logits.device)
    for start in range(0, S * T, rows):
        block = slice(start, min(start + rows, S * T))
        valid = targets[block] != IGNORE_INDEX
        z = flat[block][valid].double()
        c = upstream.double()[seq[block][valid]] if grad is not None else None
        terms = _token_terms(z, targets[block][valid], c, u_z=0.0)
        s = seq[block][valid]
        want.index_add_(0, s, terms.logp)
        var.index_add_(0, s, terms.a ** 2)
        systematic.index_add_(0, s, terms.m + terms.logp.abs())
        if grad is not None:
            got = grad.reshape(S * T, V)[block]
            expected = torch.zeros(got.shape, dtype=torch.float64, device=got.device)
            bound = torch.zeros_like(expected)
            expected[valid], bound[valid] = c[:, None] * terms.U, terms.A
            bound.add_(expected.abs() * u_out).add_(_output_floor(grad.dtype))
            _fail(name, f"the logits gradient (rows {block.start}..{block.stop})", got.double(), expected, bound)
    bound = sigmas(S) * var.sqrt() + ACC_ROUNDINGS * EPS32 * systematic
    _fail(name, "the per-sequence log-probs", logps.double(), want, bound)


# --------------------------------------------------------------------------------------------
# Linear path: a loss of per-sequence log-probs of `hidden @ weight.T`, and its gradients


@dataclasses.dataclass
class LinearLossOracle:
    loss: torch.Tensor  # float64 scalar
    loss_bound: float
    dhidden: torch.Tensor  # float64, like hidden
    dhidden_bound: torch.Tensor
    dweight: torch.Tensor  # float64, like weight
    dweight_bound: torch.Tensor


def linear_loss_oracle(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       loss_of_logps: Callable[[torch.Tensor], torch.Tensor]) -> LinearLossOracle:
    """The float64 oracle of `loss_of_logps(per-sequence log-probs of hidden @ weight.T)` with hidden
    `[S, T, H]`, weight `[V, H]` in one dtype, and its gradients w.r.t. both, each with its error bound
    (module docstring). `loss_of_logps` maps float64 `[S]` log-probs to a scalar."""
    S, T, H = hidden.shape
    V = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    u_z, u_out = logit_rounding(dtype), unit_roundoff(dtype)
    valid = labels != IGNORE_INDEX
    seq = valid.nonzero(as_tuple=True)[0]
    h = hidden.detach()[valid].double()  # [N, H]: scored tokens only
    targets = labels[valid]
    w = weight.detach().double()
    N = h.shape[0]
    rows = _block_rows(V, device)

    def blocks():
        for start in range(0, N, rows):
            block = slice(start, min(start + rows, N))
            yield block, h[block] @ w.T

    logp, a, m = (torch.empty(N, dtype=torch.float64, device=device) for _ in range(3))
    for block, z in blocks():
        terms = _token_terms(z, targets[block], None, u_z)
        logp[block], a[block], m[block] = terms.logp, terms.a, terms.m
    logps = torch.zeros(S, dtype=torch.float64, device=device).index_add_(0, seq, logp)
    logps_bound = (sigmas(S) * torch.zeros_like(logps).index_add_(0, seq, a ** 2).sqrt()
                   + ACC_ROUNDINGS * EPS32 * torch.zeros_like(logps).index_add_(0, seq, m + logp.abs()))
    logps.requires_grad_()
    loss = loss_of_logps(logps)
    (g,) = torch.autograd.grad(loss, logps)
    loss, logps, c = loss.detach(), logps.detach(), g[seq]
    loss_bound = (sigmas(1) * float((c ** 2 * a ** 2).sum().sqrt())
                  + ACC_ROUNDINGS * EPS32 * float((c.abs() * (m + logp.abs())).sum()
                                                  + (g.abs() * logps.abs()).sum() + loss.abs()))

    # The upstream gradient of each token's log-prob is the loss's gradient at the implementation's
    # log-probs, which may be off by logps_bound: through the loss's Hessian that moves every gradient
    # of a sequence's tokens together (a coherent error, added in the worst case), plus the fp32
    # evaluation of the loss's gradient itself.
    hessian = torch.autograd.functional.hessian(loss_of_logps, logps)
    dc = ((hessian.abs() @ logps_bound) + ACC_ROUNDINGS * EPS32 * g.abs())[seq]
    dh = torch.zeros(N, H, dtype=torch.float64, device=device)
    dw = torch.zeros(V, H, dtype=torch.float64, device=device)
    dh_var, dh_coherent = (torch.zeros(N, H, dtype=torch.float32, device=device) for _ in range(2))
    dw_var, dw_coherent = (torch.zeros(V, H, dtype=torch.float32, device=device) for _ in range(2))
    w_sq, h_sq, h_abs = (w ** 2).float(), (h ** 2).float(), h.abs().float()
    for block, z in blocks():
        terms = _token_terms(z, targets[block], c[block], u_z)
        per_unit = terms.U @ w  # d logp_t / d h_t
        dh[block] = c[block, None] * per_unit
        dw.addmm_(terms.U.T, c[block, None] * h[block])
        A_sq = (terms.A ** 2).float()
        dh_var[block] = A_sq @ w_sq
        dw_var.addmm_(A_sq.T, h_sq[block])
        dh_coherent[block] = (dc[block, None] * per_unit.abs()).float()
        dw_coherent.addmm_(terms.U.abs().float().T, dc[block, None].float() * h_abs[block])
    floor = _output_floor(dtype)
    dhidden = torch.zeros(S, T, H, dtype=torch.float64, device=device)
    dhidden[valid] = dh
    dhidden_bound = torch.full_like(dhidden, floor)
    dhidden_bound[valid] = sigmas(N * H) * dh_var.double().sqrt() + dh_coherent + u_out * dh.abs() + floor
    return LinearLossOracle(
        loss=loss, loss_bound=loss_bound, dhidden=dhidden, dhidden_bound=dhidden_bound, dweight=dw,
        dweight_bound=sigmas(V * H) * dw_var.double().sqrt() + dw_coherent + u_out * dw.abs() + floor)


def check_linear_loss(name: str, oracle: LinearLossOracle, loss: torch.Tensor, dhidden: Optional[torch.Tensor] = None,
                      dweight: Optional[torch.Tensor] = None) -> None:
    """Raises AssertionError unless the loss (and the gradients, when given) agree with the oracle."""
    _fail(name, "the loss", loss.detach().double().reshape(()), oracle.loss,
          torch.tensor(oracle.loss_bound, dtype=torch.float64, device=oracle.loss.device))
    if dhidden is not None:
        _fail(name, "the hidden-state gradient", dhidden.double(), oracle.dhidden, oracle.dhidden_bound)
    if dweight is not None:
        _fail(name, "the weight gradient", dweight.double(), oracle.dweight, oracle.dweight_bound)
