"""Runs each kernel of one backend once on small shapes, for `compute-sanitizer` to watch.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitizer_driver.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/cuda_sanitizer_driver.py
    python benchmarks/cuda_sanitizer_driver.py --backend cpu --device cpu     # the driver itself, on CPU

What it launches (`--backend`, default cuda; fp32, bf16 and fp16 each):

- the logits path, `dk.sequence_logps`: forward, then backward into a fresh gradient and in place
  (`inplace_backward=True`), on `[2, 5, 1000]` logits viewed with a padded row stride (1000 is no
  multiple of any block; the padding misaligns every row but the first), with masked positions and
  one all-masked row;
- the linear path's tile epilogues (`backends.kernel_table.kernel_module("tile_epilogues", backend)`):
  `fold_tile` with and without the extra statistics and `tile_logits_grad_` with and without the
  entropy term, each for the identity, scale-only and softcap transforms, on a `[3, 300]` tile with a
  row stride of 301, vocabulary offset 100, one target inside the tile, one outside and one ignored.

Each result is checked to be finite, and the driver prints one line per call, then `ok` (exit 0).
The shapes are small because the sanitizer slows every launch by orders of magnitude.
"""

from __future__ import annotations

import argparse
import sys

import torch

import dpo_kernels as dk
from dpo_kernels.backends.kernel_table import kernel_module
from dpo_kernels.backends.tile_epilogue import LogitTransform, TileStats

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRANSFORMS = {"identity": LogitTransform(), "scale": LogitTransform(pre_scale=0.5, post_scale=1 / 0.7),
              "softcap": LogitTransform(pre_scale=1.5, softcap=5.0, post_scale=1 / 0.7)}


def _check(name: str, *tensors: torch.Tensor) -> None:
    bad = [i for i, t in enumerate(tensors) if not bool(torch.isfinite(t.float()).all())]
    if bad:
        raise AssertionError(f"{name}: non-finite values in output(s) {bad}")
    print(name, flush=True)


def logits_path(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    S, T, V, padded = 2, 5, 1000, 1003
    labels = torch.randint(0, V, (S, T), generator=gen, device=device)
    labels[0, :2] = -100
    labels[1, :] = -100  # an all-masked row
    upstream = torch.randn(S, generator=gen, device=device)
    for inplace in (False, True):
        storage = torch.empty(S, T, padded, device=device).normal_(0.0, 2.0, generator=gen).to(dtype)
        logits = storage[..., :V].requires_grad_()
        out = dk.sequence_logps(logits, labels, backend=backend, inplace_backward=inplace)
        (grad,) = torch.autograd.grad(out.logps, logits, upstream)
        _check(f"sequence_logps {dtype} {'in place' if inplace else 'fresh gradient'}", out.logps, grad)


def tile_epilogues(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    kernels = kernel_module("tile_epilogues", backend)
    gen = torch.Generator(device=device).manual_seed(1)
    rows, chunk, ld, v0 = 3, 300, 301, 100
    targets = torch.tensor([v0 + 17, v0 + chunk + 5, -100], device=device)
    for name, transform in TRANSFORMS.items():
        for extras in (False, True):
            tile = torch.empty(rows, ld, device=device).normal_(0.0, 3.0, generator=gen).to(dtype)[:, :chunk]
            stats = TileStats.empty(rows, torch.float32, device, centered=extras, sum_sq=extras, sum_logits=extras,
                                    top1=extras)
            kernels.fold_tile(tile, v0, targets, stats, transform)
            # max_before_target / max_after_target may rightly stay -inf: not checked
            fields = [t for t in (stats.max, stats.sum_exp, stats.target_logit, stats.centered, stats.sum_sq,
                                  stats.sum_logits) if t is not None]
            _check(f"fold_tile {dtype} {name} {'with' if extras else 'without'} extras", *fields)
        for entropy in (False, True):
            tile = torch.empty(rows, ld, device=device).normal_(0.0, 3.0, generator=gen).to(dtype)[:, :chunk]
            row_stats = torch.stack([tile.float().amax(1), torch.full((rows,), 6.0, device=device)], 1).contiguous()
            grad = torch.tensor([1.0, -0.5, 0.0], device=device)  # the last row only written, as zeros
            extra = dict(entropy_grad=torch.full((rows,), 0.25, device=device),
                         entropy=torch.full((rows,), 4.0, device=device)) if entropy else {}
            kernels.tile_logits_grad_(tile, v0, targets, row_stats, grad, transform, **extra)
            _check(f"tile_logits_grad_ {dtype} {name} {'with' if entropy else 'without'} entropy", tile)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Launch every kernel of a backend once, on small shapes.")
    parser.add_argument("--backend", default="cuda", help="dpo_kernels backend (default cuda)")
    parser.add_argument("--device", default="cuda", help="device of the tensors (default cuda)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: PyTorch sees no CUDA device")
    for dtype in DTYPES:
        logits_path(args.backend, device, dtype)
        tile_epilogues(args.backend, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
