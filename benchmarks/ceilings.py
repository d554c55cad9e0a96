"""The device's two ceilings, measured: copy bandwidth (the bound of a memory-bound kernel) and the
bf16 matrix-product rate (the bound of a GEMM-bound one).

    python benchmarks/ceilings.py --out ceilings.json            # CUDA when PyTorch sees one, else CPU

- copy bandwidth: a device-to-device `copy_` of `--copy-bytes` (default 1 GiB on CUDA, 64 MiB on CPU),
  counting bytes read plus bytes written, median of 5 copies after one that faults the pages in;
- matrix rate: `a @ b` of random bf16 `[n, n]` matrices (`--matmul-size`, default 8192 on CUDA, 512 on
  CPU; random, not zeros, which run faster), `2 n^3` FLOPs, the mean of 10 products after 3 warm-ups.

benchmarks/conftest.py records the copy bandwidth in every benchmark JSON through `copy_bandwidth_gbs`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _timed(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth_gbs(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s): median of `repeats` copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = [_timed(device, lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * nbytes / statistics.median(times) / 1e9


def matmul_tflops(device: torch.device, n: int, warmup: int = 3, repeats: int = 10) -> float:
    """bf16 `[n, n] @ [n, n]` on random data: 2 n^3 FLOPs over the mean time of `repeats` products."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    for _ in range(warmup):
        a @ b
    total = _timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * n ** 3 * repeats / total / 1e12


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Measure the device's copy bandwidth and bf16 matmul rate.")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when PyTorch sees one)")
    parser.add_argument("--copy-bytes", type=int, default=None)
    parser.add_argument("--matmul-size", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: PyTorch sees no CUDA device")
    on_gpu = device.type == "cuda"
    nbytes = args.copy_bytes or ((1 << 30) if on_gpu else (64 << 20))
    n = args.matmul_size or (8192 if on_gpu else 512)
    if nbytes < 1 or n < 1:
        parser.error("--copy-bytes and --matmul-size must be >= 1")
    result = dict(device=str(device), copy_bytes=nbytes, matmul_size=n, torch=torch.__version__)
    if on_gpu:
        result["gpu_name"] = torch.cuda.get_device_name(device)
    result["copy_bandwidth_gbs"] = float(f"{copy_bandwidth_gbs(device, nbytes):.4g}")
    result["bf16_matmul_tflops"] = float(f"{matmul_tflops(device, n):.4g}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
