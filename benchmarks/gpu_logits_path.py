"""Logits-path timing on a GPU: each backend's forward+backward against the copy-bandwidth ceiling.

Measures the device-to-device copy bandwidth (the ceiling), then for each usable backend and the
reference times forward+backward of `dk.sequence_logps` (fresh and in-place gradient) with CUDA
events, median of --repeats after a warm-up, and reports achieved bandwidth over the byte minimum
`3 * N * V * b` (forward reads the logits, backward reads them and writes the gradient), peak extra
memory, and the error of the per-sequence log-probs against the fp32 reference. Writes JSON.

    python benchmarks/gpu_logits_path.py --tokens 16384 --vocab 128256 --dtype bfloat16 --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_kernels as dk  # noqa: E402
from peak_memory import peak_extra_bytes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _time(fn, repeats: int, device, setup=lambda: None) -> float:
    """Median seconds of fn(setup()) over `repeats` runs after one warm-up; `setup` runs untimed.
    CUDA events on GPU, wall clock on CPU."""
    fn(setup())
    times = []
    for _ in range(repeats):
        arg = setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(arg)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _time(lambda _: dst.copy_(src), repeats, device)
    return 2 * nbytes / seconds  # read + write


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    S, T, V = args.tokens // args.seq_len, args.seq_len, args.vocab
    torch.manual_seed(0)
    base = (torch.randn(S, T, V, device=device, dtype=torch.float32) * 2).to(dtype)
    labels = torch.randint(0, V, (S, T), device=device)
    upstream = torch.randn(S, device=device)
    logits_bytes = base.numel() * base.element_size()
    min_bytes = 3 * logits_bytes
    ceiling = copy_bandwidth(device, min(logits_bytes, 4 << 30), args.repeats)

    with torch.no_grad():
        expected = dk.sequence_logps(base, labels, backend="reference").logps

    def fresh_logits(inplace):
        # An in-place backward overwrites its logits: it gets a fresh copy each call (untimed).
        return lambda: base.clone().requires_grad_(True) if inplace else base.detach().requires_grad_(True)

    def step(backend, inplace):
        def call(logits):
            out = dk.sequence_logps(logits, labels, backend=backend, inplace_backward=inplace)
            torch.autograd.grad(out.logps, logits, upstream)
            return out.logps.detach()
        return call

    rows = []
    backends = [b for b in ("triton", "cuda", "cpu") if b in dk.available_backends(device)] + ["reference"]
    for backend in backends:
        for inplace in (False, True) if backend != "reference" else (False,):
            setup, call = fresh_logits(inplace), step(backend, inplace)
            seconds = _time(call, args.repeats, device, setup)
            error = (call(setup()) - expected).abs().max().item()
            logits = setup()
            peak = peak_extra_bytes(lambda: call(logits), device)
            del logits
            rows.append({
                "backend": backend, "inplace_backward": inplace, "seconds": seconds,
                "bandwidth_gbs": min_bytes / seconds / 1e9,
                "fraction_of_copy_bandwidth": min_bytes / seconds / ceiling,
                "peak_extra_gib": peak / 2**30, "max_abs_error_logps": error,
            })
            print(f"{backend:<10} inplace={inplace!s:<5} {seconds * 1e3:8.2f} ms  "
                  f"{min_bytes / seconds / 1e9:7.0f} GB/s ({min_bytes / seconds / ceiling:5.1%} of copy)  "
                  f"peak {peak / 2**30:6.2f} GiB  |dlogps| {error:.2e}")

    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "dpo_kernels": dk.__version__,
        "shape": {"S": S, "T": T, "V": V, "dtype": args.dtype},
        "byte_minimum": min_bytes, "copy_bandwidth_gbs": ceiling / 1e9, "rows": rows,
    }
    try:
        import triton  # noqa: PLC0415

        result["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"copy bandwidth {ceiling / 1e9:.0f} GB/s; byte minimum {min_bytes / 1e9:.2f} GB")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
