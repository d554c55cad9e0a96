"""The `dpo-kernels` command line.

    dpo-kernels train                                  # the embedded default: tiny Llama, shipped pairs
    dpo-kernels train --model ./my-model --data pairs.jsonl --output-dir runs/a --loss-type sigmoid sft
    dpo-kernels train --output-dir runs/a --resume     # continue the run in runs/a where it stopped
    dpo-kernels train --output-dir runs/a --resume --max-steps 2000   # ... and extend it to 2000 steps
    dpo-kernels train --resume runs/a/checkpoints/step-00000500       # continue from a given checkpoint
    torchrun --nproc-per-node 2 -m dpo_kernels.train.cli train ...   # data parallel (gloo / NCCL)
    torchrun --nproc-per-node 2 -m dpo_kernels.train.cli train --fsdp2 ...   # the policy sharded (FSDP2)

Nothing is downloaded: `--model` is a local directory, or a name already in the local Hugging Face
cache; anything else is an error. A run directory holds one run: a new run in a directory that holds
another is refused (continue it with --resume, or replace it with --overwrite). --resume restores the
run's settings from the directory; only the length of the run, the evaluation, checkpoint and log
cadence, and how a step is executed (device, backend, memory options) may change. Ctrl-C or SIGTERM:
a checkpoint at the end of the step under way, then exit status 130 or 143; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..losses.options import F_DIVERGENCE_TYPES, LOSS_TYPES
from .checkpoint import CHECKPOINT_PATTERN, list_checkpoints, peek_state, verify_checkpoint
from .config import MIXED_PRECISION, SCHEDULES, TrainConfig
from .fingerprint import file_sha256
from .interrupts import StoppedAtOnce, TrainingInterrupted, exit_status, signal_name
from .resume import CHANGEABLE_ARGUMENTS, refused_changes
from .run_directory import read_run_record, refuse_another_run, remove_run, write_run_record

log = logging.getLogger("dpo_kernels.train")

DEFAULTS = TrainConfig()
# the embedded default's run: what `make demo` trains (see docs/training.md)
DEMO_SETTINGS = dict(epochs=4.0, batch_pairs=16, learning_rate=2e-3, warmup_steps=5, eval_every=10)
# The default of each argument that has one. The parser's own defaults are None, so that the
# arguments given explicitly are known: a resumed run compares those with the run's record.
ARGUMENT_DEFAULTS = dict(
    eval_fraction=0.1, truncation_mode="keep_start",
    loss_type=["sigmoid"], beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5, discopop_tau=0.05, simpo_gamma=0.0, reference_free=False, use_weighting=False,
    precompute_ref_logps=False,
    learning_rate=DEFAULTS.learning_rate, weight_decay=DEFAULTS.weight_decay, lr_schedule=DEFAULTS.lr_schedule,
    warmup_steps=DEFAULTS.warmup_steps, max_grad_norm=DEFAULTS.max_grad_norm, batch_pairs=DEFAULTS.batch_pairs,
    grad_accumulation=DEFAULTS.grad_accumulation, epochs=DEFAULTS.epochs, seed=DEFAULTS.seed, no_shuffle=False,
    mixed_precision=DEFAULTS.mixed_precision, gradient_checkpointing=False, fsdp2=False, eager_backward=False,
    backend=DEFAULTS.backend,
    output_dir=DEFAULTS.output_dir, keep_checkpoints=DEFAULTS.keep_checkpoints, log_every=DEFAULTS.log_every,
    no_progress=False, no_plots=False,
)
NOT_SETTINGS = ("command", "resume", "overwrite")  # arguments that say what to do, not how the run trains
LOCAL_PATHS = ("model", "tokenizer", "ref_model", "data", "eval_data", "ref_cache_dir")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each argument's real default from ARGUMENT_DEFAULTS (and the embedded default's own,
    where it differs); switches (default off) and arguments whose help states it are left as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = ARGUMENT_DEFAULTS.get(action.dest)
        if default is None or isinstance(default, bool):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        demo = DEMO_SETTINGS.get(action.dest)
        return f"{text} (default: {shown}{f'; {demo} for the embedded default' if demo is not None else ''})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-kernels", description="DPO-family preference training on fused, memory-lean kernels.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser(
        "train", formatter_class=_HelpFormatter,
        help="train a causal LM on preference pairs (with no --model and no --data: the embedded default)",
        description="Train a causal LM with a DPO-family loss on preference pairs. Without --model, a small "
                    "random-init Llama over the built-in tokenizer; without --data, the shipped preference "
                    "dataset (the embedded default, with its own defaults where stated below). Writes run.json, "
                    "metrics.jsonl, plots/training.png, checkpoints/ and model/ under --output-dir.")

    g = train.add_argument_group("model and data")
    g.add_argument("--model", help="local directory (holding config.json and weights) or locally cached name of "
                                   "an AutoModelForCausalLM (default: the embedded tiny Llama)")
    g.add_argument("--tokenizer", help="tokenizer directory or cached name (default: --model's)")
    g.add_argument("--ref-model", help="reference model (default: a frozen copy of --model at step 0)")
    g.add_argument("--data", help=".jsonl/.json preference file: standard, implicit-prompt or conversational "
                                  "records (default: the shipped dataset)")
    g.add_argument("--split", help="the split of a --data .json file holding {split: [records]} (default: its "
                                   "only split)")
    g.add_argument("--eval-data", help="held-out pairs (default: --eval-split of --data, else --eval-fraction of "
                                       "--data)")
    g.add_argument("--eval-split", help="the split of --eval-data (or, without --eval-data, of --data) to "
                                        "evaluate on, e.g. test")
    g.add_argument("--eval-fraction", type=float,
                   help="share of --data held out when neither --eval-data nor --eval-split is given "
                        "(0: no evaluation)")
    g.add_argument("--max-length", type=int, help="longest prompt + completion in tokens (default: no limit)")
    g.add_argument("--max-prompt-length", type=int, help="longest prompt in tokens, keeping its end (default: no "
                                                         "limit)")
    g.add_argument("--truncation-mode", choices=("keep_start", "keep_end"),
                   help="which end of a sequence longer than --max-length is kept")

    g = train.add_argument_group("loss (the options of dk.fused_linear_dpo_loss)")
    g.add_argument("--loss-type", nargs="+", choices=LOSS_TYPES, metavar="TYPE",
                   help=f"one or more of: {', '.join(LOSS_TYPES)}")
    g.add_argument("--loss-weights", nargs="+", type=float, help="one weight per --loss-type (default: 1 each)")
    g.add_argument("--beta", type=float, help="scale of the implicit reward (beta x policy/reference log-ratio)")
    g.add_argument("--label-smoothing", type=float, help="assumed share of flipped preferences (cDPO, robust)")
    g.add_argument("--f-divergence-type", choices=F_DIVERGENCE_TYPES, help="the divergence behind the reward")
    g.add_argument("--f-alpha-divergence-coef", type=float, help="alpha of alpha_divergence")
    g.add_argument("--discopop-tau", type=float, help="temperature of the discopop loss")
    g.add_argument("--simpo-gamma", type=float, help="target reward margin (SimPO)")
    g.add_argument("--reference-free", action="store_true", default=None,
                   help="no reference model (reference log-probs 0)")
    g.add_argument("--ld-alpha", type=float, help="LD-DPO: weight of tokens beyond the shorter completion "
                                                  "(default: off)")
    g.add_argument("--use-weighting", action="store_true", default=None, help="WPO pair weights")
    g.add_argument("--precompute-ref-logps", action="store_true", default=None,
                   help="score the reference once, cache it on disk (keyed by model and data hashes), free it")
    g.add_argument("--no-router-aux-loss", action="store_true",
                   help="MoE models: leave out the router load-balancing loss that TRL adds "
                        "(router_aux_loss_coef x aux_loss)")
    g.add_argument("--ref-cache-dir", help="where cached reference log-probs live (default: OUTPUT/ref_logps)")

    g = train.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (not on biases and norm weights)")
    g.add_argument("--lr-schedule", choices=SCHEDULES, help="after the warmup")
    g.add_argument("--warmup-steps", type=int, help="optimiser steps of linear warmup")
    g.add_argument("--max-grad-norm", type=float, help="0: no clipping")
    g.add_argument("--batch-pairs", type=int, help="pairs per micro-batch")
    g.add_argument("--grad-accumulation", type=int, help="micro-batches per optimiser step")
    g.add_argument("--epochs", type=float, help="passes over the training pairs")
    g.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs; default: from --epochs)")
    g.add_argument("--seed", type=int, help="data order, held-out share, the embedded model's weights")
    g.add_argument("--no-shuffle", action="store_true", default=None, help="keep the data order")

    g = train.add_argument_group("numerics and memory")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute the backbone's activations in backward")
    g.add_argument("--fsdp2", action="store_true", default=None,
                   help="under torchrun: shard the policy with FSDP2 (each decoder layer, then the rest) instead "
                        "of keeping a whole copy on every rank")
    g.add_argument("--chunk-size", type=int, help="vocabulary chunk of the linear path (default: its own)")
    g.add_argument("--eager-backward", action="store_true", default=None,
                   help="take the gradients in forward, pair by pair, from cached tiles: no recompute "
                        "(6NHV instead of 8NHV FLOPs) for one pair's [tokens, V] logits of memory")
    g.add_argument("--backend", choices=("auto", "triton", "cuda", "cpu", "reference"),
                   help="kernels of the linear path (auto: the fastest usable here)")

    g = train.add_argument_group("output")
    g.add_argument("--output-dir", help="the run directory; it holds one run")
    g.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                   help="continue the run in --output-dir from its newest intact checkpoint, or from the "
                        "checkpoint PATH, with the run's own settings (default: a new run)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --output-dir (its run.json, metrics.jsonl, checkpoints/, "
                        "ref_logps/, model/, plots/) before starting a new one")
    g.add_argument("--eval-every", type=int, help="optimiser steps between evaluations (default: start and end; "
                                                  f"{DEMO_SETTINGS['eval_every']} for the embedded default)")
    g.add_argument("--save-every", type=int, help="optimiser steps between checkpoints (default: the end)")
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints of this run kept, newest first")
    g.add_argument("--log-every", type=int, help="optimiser steps between lines of metrics.jsonl")
    g.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
    g.add_argument("--no-plots", action="store_true", default=None, help="no PNG plots at the end")
    return parser


def _settings(args, given: dict) -> dict:
    """Every setting of the run: `given`, then the embedded default's and the general defaults."""
    embedded = given.get("model") is None and given.get("data") is None
    settings = {name: value for name, value in vars(args).items() if name not in NOT_SETTINGS}
    for name, value in settings.items():
        if given.get(name) is not None:
            settings[name] = given[name]
        elif embedded and name in DEMO_SETTINGS:
            settings[name] = DEMO_SETTINGS[name]
        else:
            settings[name] = ARGUMENT_DEFAULTS.get(name)
    return settings


def _given(args) -> dict:
    """The arguments given on the command line, local paths made absolute (a run can be resumed
    from another directory)."""
    given = {name: value for name, value in vars(args).items() if name not in NOT_SETTINGS and value is not None}
    for name in LOCAL_PATHS:
        if name in given and (Path(given[name]).exists() or name in ("data", "eval_data", "ref_cache_dir")):
            given[name] = str(Path(given[name]).absolute())
    return given


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
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise SystemExit(
            f"dpo-kernels: {kind} {name!r} is not available locally ({type(exc).__name__}: {reason}). "
            "Nothing is downloaded at run time: pass a local directory, or a name already in the Hugging Face "
            "cache (e.g. fetched beforehand with `huggingface-cli download`)."
        ) from None


def _check_local_model(flag: str, name: Optional[str]) -> None:
    """A `--model`-like argument that names a directory (it exists, or starts with '.', '/' or '~')
    must be a directory with config.json and weight files; other names are looked up in the cache."""
    if name is None:
        return
    path = Path(name).expanduser()
    if not (path.exists() or name.startswith((".", "/", "~"))):
        return
    if not path.exists():
        raise FileNotFoundError(f"{flag} {name}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{flag} {name}: not a directory (a model directory holds config.json and its weights)")
    if flag == "--tokenizer":
        return
    if not (path / "config.json").is_file():
        raise ValueError(f"{flag} {name}: the directory has no config.json (a model directory holds config.json "
                         "and weights: *.safetensors or pytorch_model*.bin)")
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.safetensors.index.json", "*.bin")):
        raise ValueError(f"{flag} {name}: the directory has config.json but no weights (*.safetensors or "
                         "pytorch_model*.bin)")


def _check_device_and_backend(device_arg: Optional[str], backend: str) -> None:
    """Refuse a device this machine lacks, or a backend that cannot run on it, before any loading."""
    import torch

    from ..backends.availability import unavailable_reason

    if device_arg is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_arg)
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {device_arg!r}: not a device (expected cpu, cuda or cuda:N)") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {device_arg}: the trainer runs on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            why = "PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {device_arg}: CUDA is not available on this machine ({why}); use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device_arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise ValueError(f"--backend {backend}: cannot run on {device}: {reason}")


def _records(path: str, split: Optional[str], flag: str):
    """The records of a data file, with the library's `split=` wording turned into the flag's."""
    from .data import load_preference_records

    try:
        return load_preference_records(path, split=split)
    except ValueError as exc:
        raise ValueError(str(exc).replace("pass split= to", f"pass {flag} to").replace("split=", f"{flag} ")) \
            from None


def _split(records, fraction: float, seed: int):
    import torch

    held = int(round(len(records) * fraction))
    if fraction > 0 and held == 0:
        held = 1
    if held >= len(records):
        raise ValueError(f"--eval-fraction {fraction} of {len(records)} pair(s) holds out {held} and leaves no "
                         "training pair: add pairs, give --eval-data or --eval-split, or pass --eval-fraction 0")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[held:]], [records[i] for i in order[:held]]


def _check_arguments(settings: dict) -> None:
    """What can be checked before anything is loaded."""
    if not 0.0 <= settings["eval_fraction"] < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {settings['eval_fraction']}")
    if settings["split"] is not None and settings["data"] is None:
        raise ValueError("--split needs --data (the shipped dataset has its own train and eval files)")
    if settings["eval_split"] is not None and settings["data"] is None and settings["eval_data"] is None:
        raise ValueError("--eval-split needs --eval-data or --data")
    if settings["tokenizer"] is not None and settings["model"] is None:
        raise ValueError("--tokenizer needs --model (the embedded model has its own tokenizer)")
    for flag, name in (("--model", "model"), ("--tokenizer", "tokenizer"), ("--ref-model", "ref_model")):
        _check_local_model(flag, settings[name])
    _check_device_and_backend(settings["device"], settings["backend"])


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


def _shown(value) -> str:
    if value is None:
        return "unset"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _resume_target(args) -> tuple:
    """(run directory, checkpoint path or None) of `--resume [PATH]`."""
    out = Path(args.output_dir if args.output_dir is not None else ARGUMENT_DEFAULTS["output_dir"])
    if args.resume is True:
        return out, None
    path = Path(args.resume)
    if not CHECKPOINT_PATTERN.match(path.name) or path.parent.name != "checkpoints":
        raise ValueError(f"--resume {path}: not a checkpoint (expected RUN/checkpoints/step-NNNNNNNN)")
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint directory")
    run = path.parent.parent
    if args.output_dir is not None and out.resolve() != run.resolve():
        raise ValueError(f"--resume {path} is a checkpoint of the run in {run}, not of --output-dir {out}")
    return run, path


def _resumed_settings(args, given: dict) -> tuple:
    """(settings, checkpoint or None, run record) of a resumed run: the run's own settings from
    run.json, with the arguments given that may change. Refuses the others, one line each."""
    out, checkpoint = _resume_target(args)
    record = read_run_record(out)
    stored = record["settings"]
    given = {name: value for name, value in given.items() if name != "output_dir"}
    refused = refused_changes(stored, given, CHANGEABLE_ARGUMENTS)
    if refused:
        lines = [f"  --{name.replace('_', '-')}: {_shown(old)} in the run, {_shown(new)} given"
                 for name, old, new in refused]
        raise ValueError(f"cannot resume the run in {out}: these arguments would change the steps it has taken:\n"
                         + "\n".join(lines) + "\nResume without them (the run keeps its own settings), or start a "
                         "new run in another --output-dir.")
    settings = {**_settings(args, stored), **given, "output_dir": str(out)}
    if "epochs" in given and "max_steps" not in given:
        settings["max_steps"] = None  # the run's length now comes from --epochs
    changed = {name: [stored.get(name), value] for name, value in settings.items()
               if name != "output_dir" and stored.get(name) != value}
    record = {**record, "settings": settings,
              "resumes": record.get("resumes", []) + [{"checkpoint": str(checkpoint or "newest"), "changed": changed}]}
    for name in ("data", "eval_data"):
        expected, path = record.get("data_sha256", {}).get(name), settings[name]
        if expected is None or path is None:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file (the run was started with it)")
        if file_sha256(path) != expected:
            raise ValueError(f"--{name.replace('_', '-')} {path}: the file changed since the run started (sha256 "
                             f"{expected[:12]}... then, {file_sha256(path)[:12]}... now): the run cannot continue on "
                             "other pairs")
    return settings, checkpoint, record


def _nothing_left(out: Path, settings: dict, given: dict, checkpoint: Optional[Path]) -> bool:
    """Before anything is loaded: there is a checkpoint to resume from; True (and a message) when
    the run already finished and the settings ask for no more steps."""
    candidates = [checkpoint] if checkpoint is not None else list_checkpoints(out / "checkpoints")
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {out / 'checkpoints'}: nothing to resume (a run that stopped "
                                "before its first checkpoint can only start again, with --overwrite)")
    state = peek_state(candidates[-1]) or {}
    step = state.get("step")
    total = settings["max_steps"] if settings["max_steps"] is not None else (
        None if "epochs" in given else state.get("total_steps"))
    if not isinstance(step, int) or not isinstance(total, int):
        return False
    if step > total:
        raise ValueError(f"--max-steps {total} is below step {step}, which {candidates[-1]} has reached")
    if step < total or not (out / "model").is_dir():
        return False
    try:
        verify_checkpoint(candidates[-1])
    except ValueError:
        return False  # broken: the trainer falls back to an older checkpoint, and there is work to do
    print(f"dpo-kernels: the run in {out} finished at step {step} of {total}: nothing left to do, nothing written "
          f"(extend it with --resume --max-steps N, N > {step})")
    return True


def run_train(args) -> dict:
    """`dpo-kernels train`: a new run, or a resumed one (`--resume`); everything checked that can be
    before anything is loaded or written."""
    given = _given(args)
    if args.resume is not None:
        if args.overwrite:
            raise ValueError("--resume continues the run in --output-dir and --overwrite deletes it: give one")
        settings, checkpoint, record = _resumed_settings(args, given)
        _check_arguments(settings)
        if _nothing_left(Path(settings["output_dir"]), settings, given, checkpoint):
            return {}
    else:
        settings, checkpoint = _settings(args, given), None
        record = {"format": 1, "settings": settings, "resumes": []}
        _check_arguments(settings)
        if not args.overwrite:
            refuse_another_run(Path(settings["output_dir"]))
    return _train(argparse.Namespace(**settings), record, resume=checkpoint or args.resume is not None,
                  overwrite=args.overwrite)


def _train(args, record: dict, *, resume, overwrite: bool) -> dict:
    """Build everything from the settings `args`, train (or resume), summarise."""
    from .data import load_preference_records, tokenize_pairs
    from .default_dataset import default_dataset_path
    from .default_model import default_model
    from .default_tokenizer import default_tokenizer
    from .trainer import DPOTrainer

    device = _start_process_group(args.device)
    embedded = args.model is None and args.data is None

    if args.model is None:
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
        train_records, eval_records = _records(args.data, args.split, "--split"), None
    if args.eval_data is not None or args.eval_split is not None:
        eval_records = _records(args.eval_data or args.data, args.eval_split, "--eval-split")
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
        learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm or None, batch_pairs=args.batch_pairs,
        grad_accumulation=args.grad_accumulation, epochs=args.epochs, max_steps=args.max_steps,
        shuffle=not args.no_shuffle, seed=args.seed, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, fsdp2=args.fsdp2, eager_backward=args.eager_backward,
        router_aux_loss=not args.no_router_aux_loss,
        chunk_size=args.chunk_size, backend=args.backend,
        log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, progress_bar=not args.no_progress, plots=not args.no_plots,
    )
    what = "the embedded default (tiny random-init Llama, shipped pairs)" if embedded else (args.model or "tiny Llama")
    log.info("model: %s, %.2fM parameters; %d training pairs, %d held out; output: %s", what,
             sum(p.numel() for p in model.parameters()) / 1e6, len(train_pairs), len(eval_pairs), args.output_dir)
    trainer = DPOTrainer(model, tokenizer, train_pairs, config, eval_pairs=eval_pairs, ref_model=ref_model,
                         device=device)
    out = Path(args.output_dir)
    if not resume and trainer.dp.is_main:
        if overwrite:
            removed = remove_run(out)
            if removed:
                log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), out)
        record["data_sha256"] = {name: file_sha256(getattr(args, name)) for name in ("data", "eval_data")
                                 if getattr(args, name) is not None}
        write_run_record(out, record)
    trainer.dp.barrier()
    started = time.perf_counter()
    record_resume = bool(resume) and trainer.dp.is_main  # once resumed: the settings the run goes on with
    try:
        final = trainer.train(resume=resume)
    except BaseException:
        if record_resume and trainer.run_id is not None:
            write_run_record(out, record)
        raise
    if record_resume and final:
        write_run_record(out, record)
    if not final:
        print(f"dpo-kernels: the run in {out} finished at step {trainer.step}: nothing left to do")
        return final
    lines = [f"done: step {trainer.step} of {trainer.total_steps} ({time.perf_counter() - started:.1f} s)"]
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
    """Run the command; returns the exit status (130/143 after SIGINT/SIGTERM)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dpo-kernels: %(message)s", stream=sys.stderr)
    try:
        if args.command == "train":
            run_train(args)
    except TrainingInterrupted as stop:
        out = stop.checkpoint.parent.parent if stop.checkpoint is not None else "--output-dir"
        print(f"dpo-kernels: stopped by {signal_name(stop.signum)} at step {stop.step}; checkpoint {stop.checkpoint} "
              f"written; continue with: dpo-kernels train --output-dir {out} --resume", file=sys.stderr)
        return exit_status(stop.signum)
    except StoppedAtOnce as stop:
        print(f"dpo-kernels: stopped at once by a second {signal_name(stop.signum)}, without a checkpoint; the "
              "checkpoints written before are intact (continue with --resume)", file=sys.stderr)
        return exit_status(stop.signum)
    except KeyboardInterrupt:
        print("dpo-kernels: interrupted (SIGINT) outside the training steps; no checkpoint was written",
              file=sys.stderr)
        return exit_status(2)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"dpo-kernels: {exc}") from None
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
