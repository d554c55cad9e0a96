"""One DPO optimiser step of a Llama-shaped model through dpo_kernels' trainer and through TRL 1.16's:
step time, peak memory, and the longest sequence that fits.

    python benchmarks/end_to_end_dpo_step.py --out e2e.json          # GPU: Llama 3.2 1B's shape, bf16
    python benchmarks/end_to_end_dpo_step.py --device cpu --hidden 32 --layers 2 --intermediate 64 \\
        --heads 4 --kv-heads 2 --vocab 512 --seq-len 32 --max-seq-len 64 --granularity 8 --out e2e.json

The model is a `transformers.LlamaForCausalLM` built from a `LlamaConfig` (random weights, seed 0) in
`--dtype` (bf16 by default), kept on the CPU; every measurement gets its own copies of it on the
device as policy and reference, so both trainers start from the same weights and nothing one
trainer did to a model (hooks, patched forwards) reaches the other. Both get:

- the same synthetic pairs: random token ids, every row `seq_len` tokens, the first quarter a prompt
  shared by chosen and rejected, no padding; `--pairs` pairs a step (2 x pairs rows);
- sigmoid DPO, beta 0.1, a live reference model (no precomputed log-probs), dropout off;
- AdamW at learning rate 0 (every step does the whole work, forward of policy and reference,
  backward, gradient clipping to norm 1.0, the AdamW update, and leaves the weights as they were);
- bf16 autocast on CUDA (our trainer's `mixed_precision="auto"`, TRL's `bf16=True`), none on CPU;
  activation checkpointing only with `--gradient-checkpointing`.

The trainers:

- `dpo_kernels`: `dpo_kernels.train.DPOTrainer` (backbone forward, then the fused linear DPO loss:
  no `[2B, T, V]` logits); a step is its `_train_step()`, the body of `train()`'s loop (collation
  included; checkpointing and evaluation, which `train()` adds, are not steps);
- `trl`: TRL 1.16's `DPOTrainer.train()` with `max_steps = warmup + steps`; a callback times each
  optimiser step (from `on_step_begin` to `on_step_end`; TRL fetches the batch before). The pairs are
  handed over tokenised: TRL's `_prepare_dataset`, which tokenises text, is skipped, since the pairs
  already are its output (`prompt_ids`, `chosen_ids`, `rejected_ids`).

Measured per trainer, at `--seq-len`: the step times after `--warmup` steps (median reported), tokens
a second (2 x pairs x seq_len over the median), and on CUDA the peak memory over the timed steps
(`torch.cuda.max_memory_allocated`: weights, gradients, optimiser state, reference and activations;
not measured on CPU). Then, unless `--no-bisect`, the longest `seq_len` that fits: one step per probe,
each with a fresh trainer; doubling from `--seq-len` until a step runs out of device memory or
`--max-seq-len` is reached, then bisecting down to `--granularity` tokens. A probe starts only when the
time left (`--time-limit`, shared by both trainers' searches) covers its estimated cost; a search cut
short says so. The JSON (`--out`, never overwritten) is rewritten after every measurement, so a run
stopped from outside keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

TRAINERS = ("dpo_kernels", "trl")
DTYPES = ("bfloat16", "float32")
BETA = 0.1


# -- the longest sequence that fits ---------------------------------------------------------------

@dataclasses.dataclass
class FitSearch:
    """The outcome of `longest_fitting`: the longest length seen to fit, the shortest seen not to,
    every probe (length, fits, seconds), and why the search stopped."""

    longest_fitting: Optional[int] = None
    shortest_failing: Optional[int] = None
    probes: List[dict] = dataclasses.field(default_factory=list)
    stopped: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _round_down(value: int, granularity: int) -> int:
    return max(granularity, value // granularity * granularity)


def longest_fitting(fits: Callable[[int], bool], start: int, maximum: int, granularity: int,
                    seconds_left: Callable[[], float], start_fits: Optional[bool] = None,
                    on_probe: Callable[[FitSearch], None] = lambda search: None) -> FitSearch:
    """Searches the longest length in [granularity, maximum] for which `fits(length)` holds, assuming
    that a length fits whenever a longer one does: doubling (or halving) from `start`, then bisecting
    until the longest fit and the shortest failure are `granularity` apart, or `maximum` fits.

    `start_fits` is what is already known about `start` (None: probe it). A probe starts only when
    `seconds_left()` is at least its estimated cost: the last probe's time, scaled by the length.
    `on_probe` sees the search after every probe."""
    search = FitSearch()

    def record(length: int, ok: bool, seconds: float) -> None:
        search.probes.append(dict(seq_len=length, fits=ok, seconds=round(seconds, 3)))
        if ok:
            search.longest_fitting = max(length, search.longest_fitting or 0)
        else:
            search.shortest_failing = min(length, search.shortest_failing or length)
        on_probe(search)

    def probe(length: int) -> Optional[bool]:
        last = search.probes[-1] if search.probes else dict(seconds=0.0, seq_len=length)
        estimate = last["seconds"] * max(1.0, length / last["seq_len"])
        left = seconds_left()
        if left <= 0 or left < estimate:
            search.stopped = f"time: {max(left, 0):.0f} s left, a probe at {length} takes about {estimate:.0f} s"
            return None
        began = time.perf_counter()
        ok = fits(length)
        record(length, ok, time.perf_counter() - began)
        return ok

    if start_fits is None:
        if probe(start) is None:
            return search
    else:
        record(start, start_fits, 0.0)
    if search.longest_fitting is None:  # halve down to the first fit
        length = start
        while search.longest_fitting is None:
            length = length // 2 // granularity * granularity
            if length < granularity:
                search.stopped = f"nothing from {granularity} tokens up fits"
                return search
            if probe(length) is None:
                return search
    while search.shortest_failing is None:  # double up to the first failure
        if search.longest_fitting >= maximum:
            search.stopped = f"fits at the maximum searched ({maximum})"
            return search
        if probe(min(2 * search.longest_fitting, maximum)) is None:
            return search
    while search.shortest_failing - search.longest_fitting > granularity:
        middle = _round_down((search.longest_fitting + search.shortest_failing) // 2, granularity)
        if middle <= search.longest_fitting:
            break
        if probe(middle) is None:
            return search
    search.stopped = f"bracketed to {granularity} tokens"
    return search


# -- the model and the data -----------------------------------------------------------------------

def build_model(args, torch):
    """The Llama-shaped causal LM (random weights, seed 0) in `args.dtype`, on the CPU. Its weights
    are initialised on the measuring device when that is CUDA (faster), then moved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.max_seq_len, 8192),
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dtype = getattr(torch, args.dtype)
    with torch.random.fork_rng(devices=[]), torch.device(args.device):
        torch.manual_seed(0)
        if args.device.startswith("cuda"):
            torch.cuda.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.to("cpu").eval()


def synthetic_pairs(seq_len: int, pairs: int, vocab: int, torch) -> List[dict]:
    """`pairs` pairs of random token ids (ids from 4 up, clear of the special tokens), each row
    `seq_len` long: a quarter prompt (at least 1 token), the rest completion."""
    prompt = max(1, seq_len // 4)
    gen = torch.Generator().manual_seed(seq_len)

    def ids(n: int) -> List[int]:
        return torch.randint(4, vocab, (n,), generator=gen).tolist()

    return [dict(prompt_ids=ids(prompt), chosen_ids=ids(seq_len - prompt), rejected_ids=ids(seq_len - prompt))
            for _ in range(pairs)]


def _models(base, device: str):
    policy = copy.deepcopy(base).to(device).train()
    reference = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    return policy, reference


# -- one trainer's steps --------------------------------------------------------------------------

class Steps:
    """`run(seq_len, warmup, steps)` -> (times of the timed steps, peak bytes or None) of one trainer."""

    def __init__(self, args, base, torch, work_dir: Path):
        self.args, self.base, self.torch, self.work_dir = args, base, torch, work_dir
        self.cuda = args.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> Optional[int]:
        return self.torch.cuda.max_memory_allocated() if self.cuda else None


class OurSteps(Steps):
    def run(self, seq_len: int, warmup: int, steps: int):
        from dpo_kernels.train.config import TrainConfig
        from dpo_kernels.train.data import TokenizedPair
        from dpo_kernels.train.default_tokenizer import default_tokenizer
        from dpo_kernels.train.trainer import DPOTrainer

        args = self.args
        pairs = [TokenizedPair(origin=f"synthetic[{i}]", **pair)
                 for i, pair in enumerate(synthetic_pairs(seq_len, args.pairs, args.vocab, self.torch))]
        config = TrainConfig(output_dir=str(self.work_dir / "dpo_kernels"), batch_pairs=args.pairs,
                             learning_rate=0.0, lr_schedule="constant", max_steps=warmup + steps, shuffle=False,
                             max_grad_norm=1.0, mixed_precision="auto",
                             gradient_checkpointing=args.gradient_checkpointing,
                             loss_options={"beta": BETA, "loss_type": "sigmoid"}, progress_bar=False, plots=False)
        policy, reference = _models(self.base, args.device)
        trainer = DPOTrainer(policy, default_tokenizer(), pairs, config, ref_model=reference, device=args.device)
        trainer.prepare_reference()
        trainer.model.train()
        times = []
        for index in range(warmup + steps):
            if index == warmup:
                self.reset_peak()
            self.sync()
            began = time.perf_counter()
            trainer._train_step()
            self.sync()
            if index >= warmup:
                times.append(time.perf_counter() - began)
        return times, self.peak()


class TrlSteps(Steps):
    def run(self, seq_len: int, warmup: int, steps: int):
        import datasets
        import trl
        from transformers import TrainerCallback

        from dpo_kernels.train.default_tokenizer import default_tokenizer

        class PretokenisedDPOTrainer(trl.DPOTrainer):
            """TRL's trainer over pairs that are already `prompt_ids` / `chosen_ids` / `rejected_ids`."""

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

        owner = self

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.times = []

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    owner.reset_peak()
                owner.sync()
                self.began = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                owner.sync()
                if state.global_step > warmup:
                    self.times.append(time.perf_counter() - self.began)

        args = self.args
        cuda = self.cuda
        config = trl.DPOConfig(
            output_dir=str(self.work_dir / "trl"), use_cpu=not cuda, bf16=cuda, fp16=False, optim="adamw_torch",
            learning_rate=0.0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            max_steps=warmup + steps, per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
            dataloader_num_workers=0, max_length=None, precompute_ref_log_probs=False, disable_dropout=True,
            beta=BETA, loss_type=["sigmoid"], seed=0, report_to=[], logging_strategy="no", save_strategy="no",
            disable_tqdm=True, **_activation_checkpointing(trl.DPOConfig, args.gradient_checkpointing))
        dataset = datasets.Dataset.from_list(synthetic_pairs(seq_len, args.pairs, args.vocab, self.torch))
        policy, reference = _models(self.base, args.device)
        timer = StepTimer()
        trainer = PretokenisedDPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                                         processing_class=default_tokenizer(), callbacks=[timer])
        trainer.train()
        return timer.times, self.peak()


def _activation_checkpointing(config_class, enabled: bool) -> dict:
    """DPOConfig turns activation checkpointing on by default; transformers 5 calls the field
    `activation_checkpointing` (`gradient_checkpointing` before)."""
    names = {field.name for field in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


# -- the run --------------------------------------------------------------------------------------

def _versions() -> dict:
    versions = {}
    for name in ("torch", "transformers", "trl", "dpo-kernels", "triton", "accelerate", "datasets"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Report:
    """The result JSON, rewritten in full (through a temporary file) after every change."""

    def __init__(self, path: Path, content: dict):
        self.path, self.content = path, content

    def write(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.content, indent=2) + "\n")
        os.replace(partial, self.path)


def _is_out_of_memory(exc: BaseException, torch) -> bool:
    """PyTorch's allocator error, or a library's error that reports the device out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(steps: Steps, seq_len: int, warmup: int, count: int, torch) -> dict:
    """Step times and peak memory at `seq_len`, or the reason there are none."""
    try:
        times, peak = steps.run(seq_len, warmup, count)
        error = None
    except Exception as exc:  # recorded: the other trainer still runs
        times, peak = [], None
        error = ("out of memory: " if _is_out_of_memory(exc, torch) else "") + f"{type(exc).__name__}: {exc}"
        error = error[:2000]
    _release(torch)
    result = dict(seq_len=seq_len, tokens_per_step=2 * steps.args.pairs * seq_len, step_s=[round(t, 6) for t in times],
                  error=error)
    if times:
        median = statistics.median(times)
        result.update(median_step_s=round(median, 6), tokens_per_s=float(f"{result['tokens_per_step'] / median:.6g}"))
    if peak is not None:
        result["peak_memory_gib"] = round(peak / 2**30, 3)
    return result


def fits(steps: Steps, seq_len: int, torch) -> bool:
    """Whether one step at `seq_len` runs without running out of device memory (other errors raise)."""
    try:
        steps.run(seq_len, 0, 1)
        ok = True
    except Exception as exc:
        if not _is_out_of_memory(exc, torch):
            raise
        ok = False
    _release(torch)
    return ok


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="result JSON (must not exist yet)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when PyTorch sees one)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the models' parameter dtype")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated, from {TRAINERS}")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs a step (2 x pairs rows)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens a row (prompt + completion) when timing")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--bisect", action=argparse.BooleanOptionalAction, default=True,
                        help="search the longest sequence that fits (default on)")
    parser.add_argument("--max-seq-len", type=int, default=131072, help="the search goes no higher")
    parser.add_argument("--granularity", type=int, default=256, help="the search stops this many tokens apart")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing in both")
    parser.add_argument("--time-limit", type=float, default=240.0,
                        help="seconds for the whole run; searches start no probe past it")
    args = parser.parse_args(argv)

    trainers = [t for t in args.trainers.split(",") if t]
    unknown = [t for t in trainers if t not in TRAINERS]
    if unknown or not trainers:
        parser.error(f"--trainers: expected a comma-separated list from {TRAINERS}, got {args.trainers!r}")
    args.trainers = trainers
    for name in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "pairs", "steps", "granularity"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads}), and --heads of "
                     f"--kv-heads ({args.kv_heads})")
    if args.vocab <= 4:
        parser.error(f"--vocab must be > 4 (ids 0-3 are special tokens), got {args.vocab}")
    if args.seq_len < 2:
        parser.error(f"--seq-len must be >= 2 (a prompt token and a completion token), got {args.seq_len}")
    if args.max_seq_len < args.seq_len:
        parser.error(f"--max-seq-len ({args.max_seq_len}) must be >= --seq-len ({args.seq_len})")
    if args.granularity < 2 and args.bisect:
        parser.error(f"--granularity must be >= 2, got {args.granularity}")
    if args.time_limit <= 0:
        parser.error(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    if args.out.exists():
        parser.error(f"--out {args.out} exists; give a new path (results are never overwritten)")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"end_to_end_dpo_step: --device {args.device}, but PyTorch sees no CUDA device", file=sys.stderr)
        return 2
    if not args.device.startswith(("cuda", "cpu")):
        print(f"end_to_end_dpo_step: --device must be cuda or cpu, got {args.device!r}", file=sys.stderr)
        return 2

    def seconds_left() -> float:
        return args.time_limit - (time.perf_counter() - started)

    environment = dict(versions=_versions(), device=args.device, threads=torch.get_num_threads())
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        environment.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = Report(args.out, dict(settings=settings, environment=environment, trainers={}, elapsed_s=None))
    report.write()

    base = build_model(args, torch)
    report.content["parameters"] = sum(p.numel() for p in base.parameters())
    report.content["model_build_s"] = round(time.perf_counter() - started, 2)
    report.write()
    print(f"model: {report.content['parameters'] / 1e9:.3f} B parameters, {args.dtype}, built in "
          f"{report.content['model_build_s']} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="e2e-dpo-step-") as work:
        runners = {"dpo_kernels": OurSteps, "trl": TrlSteps}
        steps = {name: runners[name](args, base, torch, Path(work)) for name in args.trainers}
        results = report.content["trainers"]
        for name, runner in steps.items():
            if seconds_left() <= 0:
                results[name] = dict(at_seq_len=dict(seq_len=args.seq_len, error="not run: --time-limit reached"))
                report.write()
                continue
            results[name] = dict(at_seq_len=measure(runner, args.seq_len, args.warmup, args.steps, torch))
            report.content["elapsed_s"] = round(time.perf_counter() - started, 2)
            report.write()
            print(f"{name}: {json.dumps(results[name]['at_seq_len'])}", flush=True)
        if args.bisect:
            for index, (name, runner) in enumerate(steps.items()):
                searches_left = len(steps) - index
                share_end = time.perf_counter() + seconds_left() / searches_left

                def on_probe(search, name=name):
                    results[name]["longest_seq_len"] = search.as_dict()
                    report.content["elapsed_s"] = round(time.perf_counter() - started, 2)
                    report.write()

                measured = results[name]["at_seq_len"]
                known = True if measured["error"] is None else (False if measured["error"].startswith("out of memory")
                                                                else None)
                if known is None:
                    results[name]["longest_seq_len"] = dict(stopped="not searched: no timed steps (see at_seq_len)")
                    report.write()
                    continue
                try:
                    search = longest_fitting(lambda n, runner=runner: fits(runner, n, torch), args.seq_len,
                                             args.max_seq_len, args.granularity,
                                             lambda share_end=share_end: share_end - time.perf_counter(),
                                             start_fits=known, on_probe=on_probe)
                except Exception as exc:  # a failure other than memory: recorded, the other search still runs
                    _release(torch)
                    last = results[name].get("longest_seq_len", {})
                    reason = f"a probe failed: {type(exc).__name__}: {exc}"[:2000]
                    search = FitSearch(last.get("longest_fitting"), last.get("shortest_failing"),
                                       last.get("probes", []), stopped=reason)
                on_probe(search)
                print(f"{name}: longest sequence that fits {search.longest_fitting} "
                      f"(shortest failing {search.shortest_failing}; {search.stopped})", flush=True)
    report.content["elapsed_s"] = round(time.perf_counter() - started, 2)
    report.write()
    failed = [name for name, result in report.content["trainers"].items() if result["at_seq_len"]["error"]]
    if failed:
        print(f"end_to_end_dpo_step: the timed steps failed for {failed}; see {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
