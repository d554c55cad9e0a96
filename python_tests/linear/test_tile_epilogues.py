"""The linear path's tile epilogues of every backend (contract: dpo_kernels/backends/tile_epilogue.py)
against a float64 computation over the whole vocabulary.

A random `[rows, V]` GEMM output `y` (rounded to the tile dtype, then held exactly in float64) is cut
into chunks that do not divide V; each chunk is copied into a tile whose row stride exceeds the
chunk (as a slice of a cached `[rows, V]` tile would be), folded, and later turned into its gradient
in place. Bounds: `ACC_ROUNDINGS` roundings of the accumulation dtype per unit of the magnitude
involved (|z - max| + log V + 1, see python_tests/helpers/logps.py), plus one rounding to the tile dtype for
the gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_kernels.backends.kernel_table import kernel_module
from dpo_kernels.backends.tile_epilogue import LogitTransform, TileStats
from python_tests.helpers.logps import ACC_ROUNDINGS, LOW_PRECISION, backend_params, require_backend, tolerance
from python_tests.helpers.logps import KERNEL_BACKENDS

TRANSFORMS = {
    "identity": LogitTransform(),
    "scaled": LogitTransform(pre_scale=0.75, post_scale=1 / 0.7),
    "softcap": LogitTransform(pre_scale=1.3, softcap=5.0, post_scale=1 / 1.5),
}


def _module(backend: str):
    return kernel_module("tile_epilogues", backend)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(rows, V, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    y = (torch.randn(rows, V, generator=gen, dtype=torch.float64) * scale).to(dtype).to(torch.float64)
    targets = torch.randint(0, V, (rows,), generator=gen)
    targets[0] = 0  # first and last vocabulary entries as targets (is_top1 edge cases)
    if rows > 1:
        targets[1] = V - 1
    if rows > 2:  # a row whose target is its (tied) maximum
        y[2, targets[2]] = y[2].max()
        y[2, (targets[2] + 1) % V] = y[2].max()
    return y, targets


def _exact(y, targets, transform):
    """float64 statistics of z = transform(y) over the whole vocabulary."""
    z = transform.apply(y)
    m = z.max(dim=1).values
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    V = z.shape[1]
    idx = torch.arange(V)[None, :]
    t = targets[:, None]
    before = torch.where(idx < t, z, -math.inf).max(dim=1).values
    after = torch.where(idx > t, z, -math.inf).max(dim=1).values
    return dict(
        z=z, max=m, log_sum=torch.logsumexp(z - m[:, None], dim=1), target_logit=z.gather(1, t)[:, 0],
        token_logp=logp.gather(1, t)[:, 0], entropy=-(p * logp).sum(1),
        log_sum_sq_probs=torch.log((p * p).sum(1)), mean_logits=z.mean(1),
        is_top1=z.argmax(dim=1) == targets, before=before, after=after,
    )


def _tile_view(values, dtype, device, pad):
    """A [rows, c] tile with row stride c + pad holding `values`."""
    rows, c = values.shape
    buf = torch.full((rows, c + pad), float("nan"), dtype=dtype, device=device)
    buf[:, :c] = values.to(dtype)
    return buf[:, :c]


def _chunks(V, chunk):
    return [(v0, min(chunk, V - v0)) for v0 in range(0, V, chunk)]


def _magnitude(exact, V):
    return (exact["z"] - exact["max"][:, None]).abs().max(dim=1).values + math.log(V) + 1


CASES = [
    # rows, V, chunk, tile dtype
    (7, 50, 16, torch.float32),
    (5, 300, 128, torch.float32),
    (4, 96, 33, torch.bfloat16),
    (3, 64, 64, torch.float16),
    (6, 77, 20, torch.float64),
]


# Chunks that take several warps per row in the fold (2 and 16 warps) and several spans per row in
# the gradient (2 and 5 spans) in the CUDA kernels; rows are misaligned (the tiles' row stride is
# chunk + pad). For the compiled kernels only (Triton's interpreter would take minutes).
LARGE_CASES = [
    (3, 9001, 4600, torch.float32),
    (2, 40000, 33000, torch.bfloat16),
]
LARGE_CASE_BACKENDS = ("cpu", "cuda", "cuda_emulated")


def _case_id(case):
    rows, V, chunk, dtype = case
    return f"{rows}x{V}-c{chunk}-{str(dtype).replace('torch.', '')}"


def _tile_params():
    """(backend, device, case): CASES on every kernel backend, LARGE_CASES on the compiled ones."""
    params = []
    for bp in backend_params(KERNEL_BACKENDS):
        backend = bp.values[0]
        for case in CASES + (LARGE_CASES if backend in LARGE_CASE_BACKENDS else []):
            params.append(pytest.param(*bp.values, case, id=f"{bp.id}-{_case_id(case)}", marks=bp.marks))
    return params


@pytest.mark.parametrize("backend,device,case", _tile_params())
@pytest.mark.parametrize("transform_name", list(TRANSFORMS))
@pytest.mark.parametrize("extras", [False, True], ids=["lean", "extras"])
def test_fold_tile_matches_float64(backend, device, transform_name, case, extras):
    require_backend(backend, device)
    rows, V, chunk, dtype = case
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 tiles are a CPU-backend feature")
    transform = TRANSFORMS[transform_name]
    y, targets = _inputs(rows, V, dtype, seed=rows * 1000 + V)
    exact = _exact(y, targets, transform)
    acc = _acc(dtype)
    stats = TileStats.empty(rows, acc, torch.device(device), centered=extras, sum_sq=extras, sum_logits=extras,
                            top1=extras)
    mod = _module(backend)
    targets_dev = targets.to(device)
    for v0, c in _chunks(V, chunk):
        tile = _tile_view(y[:, v0:v0 + c], dtype, device, pad=3)
        mod.fold_tile(tile, v0, targets_dev, stats, transform)

    eps = tolerance(dtype).eps
    mag = _magnitude(exact, V)
    bound = ACC_ROUNDINGS * eps * mag
    got = {k: getattr(stats, k).cpu().double() if getattr(stats, k) is not None else None
           for k in ("max", "sum_exp", "target_logit", "centered", "sum_sq", "sum_logits", "max_before_target",
                     "max_after_target")}
    # max and the target logit are single transformed elements: a few roundings of |z|
    zmag = exact["z"].abs().max(dim=1).values
    if transform.is_identity:  # the max of exactly representable values is exact
        assert torch.equal(got["max"], exact["max"])
    assert ((got["max"] - exact["max"]).abs() <= ACC_ROUNDINGS * eps * zmag).all()
    assert ((got["target_logit"] - exact["target_logit"]).abs() <= ACC_ROUNDINGS * eps * zmag).all()
    log_sum = got["sum_exp"].log()
    token_logp = (got["target_logit"] - got["max"]) - log_sum
    assert ((token_logp - exact["token_logp"]).abs() <= bound).all(), (token_logp - exact["token_logp"]).abs().max()
    assert ((log_sum - exact["log_sum"]).abs() <= bound).all()
    if not extras:
        for k in ("centered", "sum_sq", "sum_logits", "max_before_target", "max_after_target"):
            assert got[k] is None
        return
    entropy = log_sum - got["centered"] / got["sum_exp"]
    assert ((entropy - exact["entropy"]).abs() <= bound * 2).all(), (entropy - exact["entropy"]).abs().max()
    lssp = got["sum_sq"].log() - 2 * log_sum
    assert ((lssp - exact["log_sum_sq_probs"]).abs() <= bound * 3).all()
    mean = got["sum_logits"] / V
    assert ((mean - exact["mean_logits"]).abs() <= ACC_ROUNDINGS * eps * zmag * math.log2(V + 1)).all()
    for key, ref in (("max_before_target", exact["before"]), ("max_after_target", exact["after"])):
        if transform.is_identity:  # maxima of exactly representable values are exact
            assert torch.equal(got[key], ref.to(acc).double()), key
        else:  # z is computed in the accumulation dtype: a few roundings of |z|
            assert torch.equal(torch.isinf(got[key]), torch.isinf(ref)), key
            finite = torch.isfinite(ref)
            assert ((got[key] - ref)[finite].abs() <= (ACC_ROUNDINGS * eps * zmag)[finite]).all(), key
    is_top1 = (got["target_logit"] > got["max_before_target"]) & (got["target_logit"] >= got["max_after_target"])
    assert torch.equal(is_top1, exact["is_top1"])


@pytest.mark.parametrize("backend,device,case", _tile_params())
@pytest.mark.parametrize("transform_name", list(TRANSFORMS))
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_tile_logits_grad_matches_float64(backend, device, transform_name, case, with_entropy):
    require_backend(backend, device)
    rows, V, chunk, dtype = case
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 tiles are a CPU-backend feature")
    transform = TRANSFORMS[transform_name]
    y, targets = _inputs(rows, V, dtype, seed=rows * 7 + V)
    gen = torch.Generator().manual_seed(V)
    g = torch.randn(rows, generator=gen, dtype=torch.float64)
    g[-1] = 0.0  # a row with no gradient: written as zeros
    ge = torch.randn(rows, generator=gen, dtype=torch.float64) if with_entropy else None
    if ge is not None:
        ge[-1] = 0.0

    y64 = y.clone().requires_grad_()
    z = transform.apply(y64)
    logp = torch.log_softmax(z, dim=1)
    loss = (logp.gather(1, targets[:, None])[:, 0] * g).sum()
    if ge is not None:
        loss = loss + (-(logp.exp() * logp).sum(1) * ge).sum()
    (expected,) = torch.autograd.grad(loss, y64)
    exact = _exact(y, targets, transform)

    acc = _acc(dtype)
    dev = torch.device(device)
    row_stats = torch.stack([exact["max"], exact["log_sum"]], dim=1).to(acc).to(dev).contiguous()
    mod = _module(backend)
    got = torch.empty(rows, V, dtype=torch.float64)
    for v0, c in _chunks(V, chunk):
        tile = _tile_view(y[:, v0:v0 + c], dtype, device, pad=5)
        mod.tile_logits_grad_(
            tile, v0, targets.to(dev), row_stats, g.to(acc).to(dev), transform,
            entropy_grad=None if ge is None else ge.to(acc).to(dev),
            entropy=None if ge is None else exact["entropy"].to(acc).to(dev),
        )
        got[:, v0:v0 + c] = tile.cpu().double()
        assert torch.isnan(tile._base[:, c:].cpu().float()).all()  # the row padding is never written

    tol = tolerance(dtype, backend)
    p = exact["z"].sub(exact["max"][:, None]).sub(exact["log_sum"][:, None]).exp()
    mag = _magnitude(exact, V)[:, None]
    # |dy| is at most |scale| * (|g| + |ge| (|logp| + |H|)) per unit of p; each term carries
    # ACC_ROUNDINGS * eps * magnitude relative to p (and |g| absolutely at the target)
    scale = abs(transform.pre_scale * transform.post_scale)
    ge_abs = ge.abs()[:, None] if ge is not None else 0.0
    term = g.abs()[:, None] + ge_abs * (mag + exact["entropy"].abs()[:, None])
    onehot = torch.nn.functional.one_hot(targets, V).double()
    bound = scale * ACC_ROUNDINGS * tol.eps * (mag * p * term + onehot * g.abs()[:, None])
    bound = bound + tol.round_u * expected.abs() + tol.floor
    assert (got[-1] == 0).all()
    err = (got - expected).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("backend,device", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_zero_gradient_rows_are_not_read(backend, device, dtype):
    """Rows with g == 0 (and no entropy gradient) become zeros even when the tile holds NaN there."""
    require_backend(backend, device)
    rows, V = 4, 40
    tile = torch.full((rows, V), float("nan"), dtype=dtype, device=device)
    targets = torch.zeros(rows, dtype=torch.int64, device=device)
    row_stats = torch.full((rows, 2), float("nan"), device=device)
    g = torch.zeros(rows, device=device)
    _module(backend).tile_logits_grad_(tile, 0, targets, row_stats, g, LogitTransform())
    assert (tile == 0).all()
