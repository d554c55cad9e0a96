"""The `dpo-kernels` command line.

    dpo-kernels train                                  # the embedded default: tiny Llama, shipped pairs
    dpo-kernels train --model ./my-model --data pairs.jsonl --output-dir runs/a --loss-type sigmoid sft
    dpo-kernels train --output-dir runs/a --resume     # continue the run in runs/a where it stopped
    torchrun --nproc-per-node 2 -m dpo_kernels.train.cli train ...   # data parallel (gloo / NCCL)
    torchrun --nproc-per-node 2 -m dpo_kernels.train.cli train --fsdp2 ...   # the policy sharded (FSDP2)

Nothing is downloaded: `--model` is a local directory, or a name already in the local Hugging Face
cache; anything else is an error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..losses.options import F_DIVERGENCE_TYPES, LOSS_TYPES
from .config import MIXED_PRECISION, SCHEDULES, TrainConfig

log = logging.getLogger("dpo_kernels.train")

DEFAULTS = TrainConfig()
# the embedded default's run: what `make demo` trains (see README, "Train")
DEMO_SETTINGS = dict(epochs=4.0, batch_pairs=16, learning_rate=2e-3, warmup_steps=5, eval_every=10)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-kernels", description="DPO-family preference training on fused, memory-lean kernels.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser(
        "train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train a causal LM on preference pairs (with no --model and no --data: the embedded default)",
        description="Train a causal LM with a DPO-family loss on preference pairs. Without --model, a small "
                    "random-init Llama over the built-in tokenizer; without --data, the shipped preference "
                    "dataset. Writes metrics.jsonl, plots/training.png, checkpoints/ and model/ under "
                    "--output-dir.")

    g = train.add_argument_group("model and data")
    g.add_argument("--model", help="local directory or locally cached name of an AutoModelForCausalLM "
                                   "(default: the embedded tiny Llama)")
    g.add_argument("--tokenizer", help="tokenizer directory or cached name (default: --model's)")
    g.add_argument("--ref-model", help="reference model (default: a frozen copy of --model at step 0)")
    g.add_argument("--data", help=".jsonl/.json preference file: standard, implicit-prompt or conversational "
                                  "records (default: the shipped dataset)")
    g.add_argument("--eval-data", help="held-out pairs (default: --eval-fraction of --data)")
    g.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of --data held out when --eval-data is not given (0: no evaluation)")
    g.add_argument("--max-length", type=int, help="longest prompt + completion in tokens (None: no limit)")
    g.add_argument("--max-prompt-length", type=int, help="longest prompt in tokens, keeping its end")
    g.add_argument("--truncation-mode", choices=("keep_start", "keep_end"), default="keep_start",
                   help="which end of a sequence longer than --max-length is kept")

    g = train.add_argument_group("loss (the options of dk.fused_linear_dpo_loss)")
    g.add_argument("--loss-type", nargs="+", default=["sigmoid"], choices=LOSS_TYPES, metavar="TYPE",
                   help=f"one or more of: {', '.join(LOSS_TYPES)}")
    g.add_argument("--loss-weights", nargs="+", type=float, help="one weight per --loss-type")
    g.add_argument("--beta", type=float, default=0.1)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--f-divergence-type", choices=F_DIVERGENCE_TYPES, default="reverse_kl")
    g.add_argument("--f-alpha-divergence-coef", type=float, default=0.5)
    g.add_argument("--discopop-tau", type=float, default=0.05)
    g.add_argument("--simpo-gamma", type=float, default=0.0)
    g.add_argument("--reference-free", action="store_true", help="no reference model (reference log-probs 0)")
    g.add_argument("--ld-alpha", type=float, help="LD-DPO: weight of tokens beyond the shorter completion")
    g.add_argument("--use-weighting", action="store_true", help="WPO pair weights")
    g.add_argument("--precompute-ref-logps", action="store_true",
                   help="score the reference once, cache it on disk (keyed by model and data hashes), free it")
    g.add_argument("--no-router-aux-loss", action="store_true",
                   help="MoE models: leave out the router load-balancing loss that TRL adds "
                        "(router_aux_loss_coef x aux_loss)")
    g.add_argument("--ref-cache-dir", help="where cached reference log-probs live (default: OUTPUT/ref_logps)")

    g = train.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, default=None,
                   help=f"AdamW learning rate (default {DEFAULTS.learning_rate}; "
                        f"{DEMO_SETTINGS['learning_rate']} for the embedded default)")
    g.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    g.add_argument("--lr-schedule", choices=SCHEDULES, default=DEFAULTS.lr_schedule)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm, help="0: no clipping")
    g.add_argument("--batch-pairs", type=int, default=None, help="pairs per micro-batch")
    g.add_argument("--grad-accumulation", type=int, default=DEFAULTS.grad_accumulation)
    g.add_argument("--epochs", type=float, default=None)
    g.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g.add_argument("--no-shuffle", action="store_true", help="keep the data order")

    g = train.add_argument_group("numerics and memory")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--fsdp2", action="store_true",
                   help="under torchrun: shard the policy with FSDP2 (each decoder layer, then the rest) instead "
                        "of keeping a whole copy on every rank")
    g.add_argument("--chunk-size", type=int, help="vocabulary chunk of the linear path")
    g.add_argument("--eager-backward", action="store_true",
                   help="take the gradients in forward, pair by pair, from cached tiles: no recompute "
                        "(6NHV instead of 8NHV FLOPs) for one pair's [tokens, V] logits of memory")
    g.add_argument("--backend", choices=("auto", "triton", "cuda", "cpu", "reference"), default="auto")

    g = train.add_argument_group("output")
    g.add_argument("--output-dir", default="dpo_output")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    g.add_argument("--eval-every", type=int, help="optimiser steps between evaluations (default: start and end)")
    g.add_argument("--save-every", type=int, help="optimiser steps between checkpoints (default: the end)")
    g.add_argument("--keep-checkpoints", type=int, default=DEFAULTS.keep_checkpoints)
    g.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true", help="no PNG plots at the end")
    return parser


def _loss_options(args) -> dict:
    options = dict(beta=args.beta, loss_type=args.loss_type if len(args.loss_type) > 1 else args.loss_type[0],
                   label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
                   f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
                   simpo_gamma=args.simpo_gamma, reference_free=args.reference_free,
                   use_weighting=args.use_weighting)
    if args.loss_weights is not None:
        options["loss_weights"] = args.loss_weights
    if args.ld_alpha is not None:
        options["ld_alpha"] = args.ld_alpha
    return options


def _load_pretrained(kind: str, name: str, loader):
    """`loader(name, local_files_only=True)`, or a SystemExit saying nothing is downloaded."""
    try:
        return loader(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"dpo-kernels: {kind} {name!r} is not available locally ({type(exc).__name__}: {str(exc)[:200]}). "
            "Nothing is downloaded at run time: pass a local directory, or a name already in the Hugging Face "
            "cache (e.g. fetched beforehand with `huggingface-cli download`)."
        ) from None


def _split(records, fraction: float, seed: int):
    import torch

    if not 0.0 <= fraction < 1.0:
        raise SystemExit(f"dpo-kernels: --eval-fraction must be in [0, 1), got {fraction}")
    held = int(round(len(records) * fraction))
    if fraction > 0 and held == 0:
        held = 1
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[held:]], [records[i] for i in order[:held]]


def _start_process_group(device_arg):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, else gloo) and return
    this rank's device; otherwise return `device_arg` unchanged."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device_arg
    use_cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"


def run_train(args) -> dict:
    """`dpo-kernels train`: build everything from the arguments, train, summarise."""
    from .data import load_preference_records, tokenize_pairs
    from .default_dataset import default_dataset_path
    from .default_model import default_model
    from .default_tokenizer import default_tokenizer
    from .trainer import DPOTrainer

    device = _start_process_group(args.device)
    embedded = args.model is None and args.data is None
    demo = DEMO_SETTINGS if embedded else {}

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else demo.get(name, default)

    if args.model is None:
        if args.tokenizer is not None:
            raise SystemExit("dpo-kernels: --tokenizer needs --model (the embedded model has its own tokenizer)")
        tokenizer = default_tokenizer()
        model = default_model(tokenizer, seed=args.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = _load_pretrained("tokenizer", args.tokenizer or args.model, AutoTokenizer.from_pretrained)
        model = _load_pretrained("model", args.model, AutoModelForCausalLM.from_pretrained)
    ref_model = None
    if args.ref_model is not None:
        from transformers import AutoModelForCausalLM
        ref_model = _load_pretrained("reference model", args.ref_model, AutoModelForCausalLM.from_pretrained)

    if args.data is None:
        train_records = load_preference_records(default_dataset_path("train"))
        eval_records = load_preference_records(default_dataset_path("eval")) if args.eval_data is None else None
    else:
        train_records, eval_records = load_preference_records(args.data), None
    if args.eval_data is not None:
        eval_records = load_preference_records(args.eval_data)
    elif eval_records is None:
        train_records, eval_records = _split(train_records, args.eval_fraction, args.seed)
    tokenize = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                    truncation_mode=args.truncation_mode)
    train_pairs, report = tokenize_pairs(train_records, tokenizer, **tokenize)
    log.info("training pairs: %s", report)
    eval_pairs = []
    if eval_records:
        eval_pairs, eval_report = tokenize_pairs(eval_records, tokenizer, **tokenize)
        log.info("held-out pairs: %s", eval_report)

    config = TrainConfig(
        output_dir=args.output_dir, loss_options=_loss_options(args),
        precompute_ref_logps=args.precompute_ref_logps, ref_cache_dir=args.ref_cache_dir,
        learning_rate=pick("learning_rate", DEFAULTS.learning_rate), weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule, warmup_steps=pick("warmup_steps", DEFAULTS.warmup_steps),
        max_grad_norm=args.max_grad_norm or None, batch_pairs=pick("batch_pairs", DEFAULTS.batch_pairs),
        grad_accumulation=args.grad_accumulation, epochs=pick("epochs", DEFAULTS.epochs), max_steps=args.max_steps,
        shuffle=not args.no_shuffle, seed=args.seed, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, fsdp2=args.fsdp2, eager_backward=args.eager_backward,
        router_aux_loss=not args.no_router_aux_loss,
        chunk_size=args.chunk_size, backend=args.backend,
        log_every=args.log_every, eval_every=pick("eval_every", None), save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, progress_bar=not args.no_progress, plots=not args.no_plots,
    )
    what = "the embedded default (tiny random-init Llama, shipped pairs)" if embedded else (args.model or "tiny Llama")
    log.info("model: %s, %.2fM parameters; %d training pairs, %d held out; output: %s", what,
             sum(p.numel() for p in model.parameters()) / 1e6, len(train_pairs), len(eval_pairs), args.output_dir)
    trainer = DPOTrainer(model, tokenizer, train_pairs, config, eval_pairs=eval_pairs, ref_model=ref_model,
                         device=device)
    started = time.perf_counter()
    final = trainer.train(resume=args.resume)
    out = Path(args.output_dir)
    lines = [f"done: {trainer.step} steps in {time.perf_counter() - started:.1f} s"]
    if eval_pairs:
        lines.append(f"held-out reward accuracy {final['rewards/accuracies']:.3f}, "
                     f"margin {final['rewards/margins']:.4f}, loss {final['loss']:.4f}")
    lines.append(f"metrics: {out / 'metrics.jsonl'}")
    if not args.no_plots:
        lines.append(f"plots: {out / 'plots' / 'training.png'}")
    lines.append(f"model: {out / 'model'}")
    if trainer.dp.is_main:
        print("\n".join(lines))
    return final


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dpo-kernels: %(message)s", stream=sys.stderr)
    try:
        if args.command == "train":
            run_train(args)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"dpo-kernels: {exc}") from None
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
