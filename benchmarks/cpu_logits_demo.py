"""`make demo` (until the trainer lands): the fused CPU kernel against the plain PyTorch reference.

For N = S * T tokens and vocabulary V (default 8 x 512 tokens, V = 32000, fp32), times forward and
forward+backward of per-sequence log-probs, measures each call's peak extra memory, and checks
values and gradients against the float64 oracle. Prints a table.

    python benchmarks/cpu_logits_demo.py [--seqs 8] [--seq-len 512] [--vocab 32000] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_kernels as dk  # noqa: E402
from peak_memory import cpu_peak_supported, peak_extra_bytes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _reference(logits, labels):
    return dk.reference.sequence_logps(logits, labels).logps  # log_softmax(logits.float()), gather, sum


def _fused(logits, labels, inplace=False):
    return dk.sequence_logps(logits, labels, backend="cpu", inplace_backward=inplace).logps


IMPLEMENTATIONS = {
    "reference (log_softmax fp32)": lambda x, y: _reference(x, y),
    "dk cpu": lambda x, y: _fused(x, y),
    "dk cpu, inplace_backward": lambda x, y: _fused(x, y, inplace=True),
}


def _forward_backward(impl, base, labels, upstream):
    logits = base.clone().requires_grad_(True)  # non-leaf gradient path: autograd.grad, no .grad copy
    start = time.perf_counter()
    logps = impl(logits, labels)
    (grad,) = torch.autograd.grad(logps, logits, upstream)
    return time.perf_counter() - start, logps.detach(), grad


def _median_time(fn, repeats):
    return statistics.median(fn() for _ in range(repeats))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--prompt-fraction", type=float, default=0.25,
                        help="leading fraction of each sequence masked with -100, as DPO prompts are")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    S, T, V, dtype = args.seqs, args.seq_len, args.vocab, DTYPES[args.dtype]
    base = (torch.randn(S, T, V) * 2).to(dtype)
    labels = torch.randint(0, V, (S, T))
    labels[:, : int(T * args.prompt_fraction)] = -100  # a prompt that is not trained on
    upstream = torch.randn(S)

    exact = base.double().requires_grad_(True)
    exact_logps = dk.reference.sequence_logps(exact, labels, compute_dtype=torch.float64).logps
    (exact_grad,) = torch.autograd.grad(exact_logps, exact, upstream.double())
    exact_logps, exact_grad = exact_logps.detach(), exact_grad.detach()
    del exact

    print(f"dpo_kernels {dk.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"logits [{S}, {T}, {V}] {args.dtype} ({base.numel() * base.element_size() / 2**20:.0f} MiB), "
          f"N = {S * T} tokens ({args.prompt_fraction:.0%} masked as prompt), median of {args.repeats}; "
          "errors against the float64 oracle\n")
    header = f"{'implementation':<30}{'fwd ms':>9}{'fwd+bwd ms':>12}{'speedup':>9}{'peak MiB':>10}{'|dlogps|':>11}{'|dgrad|':>11}"
    print(header)
    print("-" * len(header))
    reference_time = None
    for name, impl in IMPLEMENTATIONS.items():
        _forward_backward(impl, base, labels, upstream)  # warm-up
        with torch.no_grad():
            def forward_only():
                start = time.perf_counter()
                impl(base, labels)
                return time.perf_counter() - start
            forward_time = _median_time(forward_only, args.repeats)
        both_time = _median_time(lambda: _forward_backward(impl, base, labels, upstream)[0], args.repeats)
        reference_time = reference_time or both_time
        _, logps, grad = _forward_backward(impl, base, labels, upstream)
        logps_error = (logps.double() - exact_logps).abs().max().item()
        grad_error = (grad.double() - exact_grad).abs().max().item()
        del grad

        def call():
            logits = base.clone().requires_grad_(True)
            logps = impl(logits, labels)
            return torch.autograd.grad(logps, logits, upstream)

        logits_bytes = base.numel() * base.element_size()
        if cpu_peak_supported():
            # The clone of the inputs is part of `call`; subtract it so only the call's own memory counts.
            peak = f"{(peak_extra_bytes(call) - logits_bytes) / 2**20:.0f}"
        else:
            peak = "n/a"
        print(f"{name:<30}{forward_time * 1e3:>9.1f}{both_time * 1e3:>12.1f}{reference_time / both_time:>8.1f}x"
              f"{peak:>10}{logps_error:>11.2e}{grad_error:>11.2e}")
    print(f"\nThe logits gradient alone is {base.numel() * base.element_size() / 2**20:.0f} MiB "
          "(the floor for a fresh-buffer backward; the in-place backward needs none).")


if __name__ == "__main__":
    main()
