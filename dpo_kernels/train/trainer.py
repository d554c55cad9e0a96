"""`DPOTrainer`: the DPO loss family on a Hugging Face causal LM through `dk.fused_linear_dpo_loss`.

Each step runs the model's backbone only (no lm_head forward, so no `[2B, T, V]` logits), then the
linear path scores the completion tokens from the last hidden states and the lm_head weight (tied
or not, with its bias, `logit_scale` and `final_logit_softcapping`). The reference log-probs come
from a frozen copy of the policy (or a given reference model), scored live or precomputed once and
cached on disk. AdamW with warmup and a schedule, gradient accumulation and clipping, bf16 autocast
on CUDA, gradient checkpointing, held-out evaluation, JSONL metrics, PNG plots, atomic and verified
checkpoints with exact resume, a checkpoint on SIGINT/SIGTERM, and `save_pretrained` at the end.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..losses.fused_linear_dpo_loss import fused_linear_dpo_loss
from .checkpoint import (latest_session, newest_intact_checkpoint, read_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .config import TrainConfig
from .data import collate_pairs
from .data_parallel import DataParallel
from .fingerprint import model_fingerprint, pairs_fingerprint
from .interrupts import StopRequests, TrainingInterrupted
from .lr_schedule import make_scheduler, recompute_learning_rate
from .metrics_log import MetricsLog
from .model_quirks import disable_training_randomness
from .model_sharding import full_model_state, full_optimizer_state, load_full_states, shard_model, sharded_hidden_states
from .output_head import check_output_head, last_hidden_states, output_head
from .reference_logps import precompute_reference_logps, reference_sequence_logps
from .resume import CHANGEABLE_SETTINGS, refused_changes
from .router_aux_loss import add_router_aux_loss, hidden_states_and_router_aux_loss, router_aux_loss_coef
from .run_directory import refuse_another_run

log = logging.getLogger(__name__)


class DPOTrainer:
    """Train `model` (an `AutoModelForCausalLM`) on tokenised preference pairs.

    Args:
        model: the policy; trained in place.
        tokenizer: used for its pad token (and saved with the model at the end).
        train_pairs, eval_pairs: `TokenizedPair`s (see `dpo_kernels.train.data`).
        config: a `TrainConfig`.
        ref_model: the reference; default a frozen copy of `model` as it is now (not used, and not
            made, with `reference_free=True`). With `precompute_ref_logps` it is freed after scoring.
        device: default: CUDA when available, else CPU.
    """

    def __init__(self, model, tokenizer, train_pairs: Sequence, config: TrainConfig, *,
                 eval_pairs: Optional[Sequence] = None, ref_model=None, device=None, ignore_index: int = -100):
        config.validate()
        if len(train_pairs) == 0:
            raise ValueError("train_pairs is empty: nothing to train on")
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.train_pairs = list(train_pairs)
        self.eval_pairs = list(eval_pairs or [])
        self.ignore_index = ignore_index
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
        self.output_dir = Path(config.output_dir)
        self.loss_options = dict(config.loss_options)
        self.dp = DataParallel()
        if config.fsdp2 and not self.dp.active:
            raise ValueError("fsdp2=True needs torch.distributed with 2 or more processes (run under torchrun)")
        self.dp.broadcast_parameters(self.model)
        if config.disable_dropout:
            disable_training_randomness(self.model)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        probe = collate_pairs(self.train_pairs[:1], pad_token_id=self.pad_token_id, ignore_index=ignore_index)
        check_output_head(self.model, output_head(self.model), probe["input_ids"].to(self.device),
                          probe["attention_mask"].to(self.device))

        self.reference_free = bool(self.loss_options.get("reference_free", False))
        self.ref_model = None
        if not self.reference_free:
            self.ref_model = copy.deepcopy(self.model) if ref_model is None else ref_model.to(self.device)
            self.ref_model.eval().requires_grad_(False)
            if config.disable_dropout:
                disable_training_randomness(self.ref_model)
        self.ref_fingerprint = None if self.ref_model is None else model_fingerprint(self.ref_model)
        self.data_fingerprint = pairs_fingerprint(self.train_pairs)
        self._ref_tables = {}
        self.sharded = config.fsdp2
        if self.sharded:  # after the reference copy: the reference stays whole on every rank
            shard_model(self.model)
        self.head = output_head(self.model)  # after sharding: the parameters FSDP2 registered
        # MoE: TRL's router load-balancing term (0.0: none for this model, or turned off)
        self.router_aux_coef = router_aux_loss_coef(self.model) if config.router_aux_loss else 0.0

        micro_per_epoch = math.ceil(len(self.train_pairs) / (config.batch_pairs * self.dp.world_size))
        self.micro_per_epoch = micro_per_epoch
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * micro_per_epoch
                                                                / config.grad_accumulation))
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # biases and norm scales, as HF's Trainer
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps)
        self.scheduler = make_scheduler(self.optimizer, warmup_steps=config.warmup_steps,
                                        total_steps=self.total_steps, schedule=config.lr_schedule)
        self.step = 0
        self.run_id: Optional[str] = None  # set when the run starts, kept across resumes
        self.session = 0  # one per start or resume; orders checkpoints (see checkpoint.py)
        self._saved = (None, None)  # (step, path) of the last checkpoint written or resumed from

    # -- numerics -------------------------------------------------------------------------------------
    def autocast(self):
        mode = self.config.mixed_precision
        if mode == "bf16" or (mode == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- data -----------------------------------------------------------------------------------------
    def _batch(self, pairs: Sequence, indices: torch.Tensor) -> dict:
        batch = collate_pairs([pairs[i] for i in indices.tolist()], pad_token_id=self.pad_token_id,
                              ignore_index=self.ignore_index)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["pair_index"] = indices.to(self.device)
        return batch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        n = len(self.train_pairs)
        if not self.config.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch))

    def global_micro_batch(self, index: int) -> torch.Tensor:
        """Pair indices of the `index`-th global micro-batch of the run (`batch_pairs` per rank); a
        pure function of the index, the seed, the data and the world size, which makes resume exact."""
        epoch, position = divmod(index, self.micro_per_epoch)
        size = self.config.batch_pairs * self.dp.world_size
        return self._epoch_order(epoch)[position * size:(position + 1) * size]

    def _local_part(self, pairs: Sequence, indices: torch.Tensor):
        """(batch, pairs it counts for) of this rank's part of a global batch. A rank whose part is
        empty still runs its first pair, with weight 0, so every rank takes part in the collectives."""
        part = self.dp.local_part(indices)
        if part.numel() == 0:
            return self._batch(pairs, indices[:1]), 0
        return self._batch(pairs, part), part.numel()

    def _eval_batches(self):
        size = (self.config.eval_batch_pairs or self.config.batch_pairs) * self.dp.world_size
        for start in range(0, len(self.eval_pairs), size):
            yield self._local_part(self.eval_pairs, torch.arange(start, min(start + size, len(self.eval_pairs))))

    # -- reference ------------------------------------------------------------------------------------
    def _precompute(self, split: str, pairs: Sequence) -> torch.Tensor:
        size = self.config.eval_batch_pairs or self.config.batch_pairs

        def batches():
            for start in range(0, len(pairs), size):
                yield self._batch(pairs, torch.arange(start, min(start + size, len(pairs))))

        cache_dir = Path(self.config.ref_cache_dir or self.output_dir / "ref_logps")
        return precompute_reference_logps(
            self.ref_model, pairs, batches, cache_dir=cache_dir, loss_options=self.loss_options,
            ignore_index=self.ignore_index, chunk_size=self.config.chunk_size, backend=self.config.backend,
            autocast=self.autocast, progress=self._progress,
        ).to(self.device)

    def prepare_reference(self) -> None:
        """With `precompute_ref_logps`: score (or load) both splits, then free the reference model.
        Under data parallelism rank 0 scores and writes the cache; the other ranks then load it."""
        if self.reference_free or not self.config.precompute_ref_logps or self._ref_tables:
            return
        splits = [("train", self.train_pairs)] + ([("eval", self.eval_pairs)] if self.eval_pairs else [])
        if not self.dp.is_main:
            self.dp.barrier()
        for split, pairs in splits:
            self._ref_tables[split] = self._precompute(split, pairs)
        if self.dp.is_main:
            self.dp.barrier()
        self.ref_model = None

    def _reference(self, split: str, batch: dict):
        if self.reference_free:
            return None, None
        if split in self._ref_tables:
            table = self._ref_tables[split][batch["pair_index"]]
            return table[:, 0], table[:, 1]
        logps = reference_sequence_logps(self.ref_model, batch, loss_options=self.loss_options,
                                         ignore_index=self.ignore_index, chunk_size=self.config.chunk_size,
                                         backend=self.config.backend, autocast=self.autocast)
        return logps.chunk(2)

    # -- loss -----------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict, split: str = "train"):
        """`dk.DPOOutput` of one batch: backbone forward, then the fused linear DPO loss."""
        ref_chosen, ref_rejected = self._reference(split, batch)
        with self.autocast():
            aux_loss = None
            if self.router_aux_coef:  # the full forward, for the model's own aux loss (and FSDP2's hooks)
                hidden, aux_loss = hidden_states_and_router_aux_loss(self.model, batch["input_ids"],
                                                                     batch["attention_mask"])
            elif self.sharded:  # the root forward, then the head it left unsharded (see model_sharding)
                hidden = sharded_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
            else:
                hidden = last_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
            head = output_head(self.model) if self.sharded else self.head
            out = fused_linear_dpo_loss(
                hidden, head.weight, batch["labels"], head.bias, ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected, ignore_index=self.ignore_index, shift=True,
                logit_scale=head.logit_scale, softcap=head.softcap, chunk_size=self.config.chunk_size,
                eager_backward=self.config.eager_backward and self.model.training,
                backend=self.config.backend, **self.loss_options)
        return out if aux_loss is None else add_router_aux_loss(out, aux_loss, self.router_aux_coef)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and metrics over the held-out pairs, averaged with each batch weighted by its pairs."""
        if not self.eval_pairs:
            return {}
        self.prepare_reference()
        was_training = self.model.training
        self.model.eval()
        totals = {}
        try:
            for batch, pairs in self._eval_batches():
                out = self.compute_loss(batch, "eval")
                for key, value in {"loss": out.loss.item(), **out.metrics}.items():
                    totals[key] = totals.get(key, 0.0) + value * pairs
                totals["pairs"] = totals.get("pairs", 0.0) + pairs
        finally:
            self.model.train(was_training)
        totals = self.dp.sum_values(totals, self.device)
        count = totals.pop("pairs")
        return {key: value / count for key, value in totals.items()}

    def _train_step(self) -> dict:
        """One optimiser step over `grad_accumulation` micro-batches; returns its metrics."""
        config = self.config
        first = self.step * config.grad_accumulation
        global_batches = [self.global_micro_batch(first + i) for i in range(config.grad_accumulation)]
        total_pairs = sum(indices.numel() for indices in global_batches)
        totals = {}
        for indices in global_batches:
            batch, pairs = self._local_part(self.train_pairs, indices)
            out = self.compute_loss(batch, "train")
            share = pairs / total_pairs  # the step's loss is the mean over all its pairs, on all ranks
            # FSDP2 averages gradients over ranks where the replicated mode sums them
            (out.loss * (share * self.dp.world_size if self.sharded else share)).backward()
            for key, value in {"loss": out.loss.item(), **out.metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * share
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not self.sharded:
            self.dp.sum_gradients(params)
        totals = self.dp.sum_values(totals, self.device)
        # with max_norm=inf the gradients are left as they are and only the norm is taken
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, config.max_grad_norm if config.max_grad_norm is not None else float("inf"))
        totals["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        totals["learning_rate"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        totals["epoch"] = self.step * config.grad_accumulation / self.micro_per_epoch
        return totals

    # -- checkpoints ----------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "config": self.config.to_dict(),
                "reference": self.ref_fingerprint, "data": self.data_fingerprint,
                "world_size": self.dp.world_size, "run_id": self.run_id, "session": self.session, "format": 2}

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint (with every rank's random state); all ranks return its path."""
        states = [rng_state()]
        if self.dp.active:
            import torch.distributed as dist
            states = [None] * self.dp.world_size
            dist.all_gather_object(states, rng_state())
        path = self.output_dir / "checkpoints" / f"step-{self.step:08d}"
        model_state = full_model_state(self.model, self.sharded)  # collective when sharded
        optimizer_state = full_optimizer_state(self.model, self.optimizer, self.sharded)
        if self.dp.is_main:
            path = save_checkpoint(self.output_dir / "checkpoints", self.step, model_state=model_state,
                                   optimizer_state=optimizer_state, scheduler_state=self.scheduler.state_dict(),
                                   rng_states=states, trainer_state=self._trainer_state(),
                                   keep=self.config.keep_checkpoints)
        self.dp.barrier()
        self._saved = (self.step, path)
        return path

    def _checkpoint_now(self) -> Path:
        """The checkpoint of the current step: the one already written, or a new one."""
        step, path = self._saved
        return path if step == self.step else self.save_checkpoint()

    def resume(self, checkpoint: Optional[Path] = None) -> Path:
        """Restore `checkpoint`, or the newest intact checkpoint under `output_dir` (with a warning
        naming each newer one skipped because a file is missing, truncated or altered). Refuses a
        checkpoint of other data, another reference model, or settings that change the losses; a
        refused or broken checkpoint changes nothing on disk. FileNotFoundError without any checkpoint."""
        checkpoints_dir = self.output_dir / "checkpoints"
        if checkpoint is None:
            path, skipped = newest_intact_checkpoint(checkpoints_dir)
            for reason in skipped:
                log.warning("skipping a broken checkpoint: %s", reason)
        else:
            path = Path(checkpoint)
        checkpoint = read_checkpoint(path, rank=self.dp.rank, device="cpu" if self.sharded else self.device,
                                     verify=checkpoint is not None)
        state = checkpoint.trainer_state
        problems = [f"setting {name}: checkpoint {old!r}, now {new!r}"
                    for name, old, new in refused_changes(state["config"], self.config.to_dict(), CHANGEABLE_SETTINGS)]
        if state["data"] != self.data_fingerprint:
            problems.append("the training pairs differ")
        if state.get("world_size", 1) != self.dp.world_size:
            problems.append(f"it was written by {state.get('world_size', 1)} process(es), this run has "
                            f"{self.dp.world_size}")
        if state["reference"] != self.ref_fingerprint:
            problems.append("the reference model differs (pass the model the run started from)")
        if state["step"] > self.total_steps:
            problems.append(f"it is at step {state['step']}, beyond the {self.total_steps} steps of this run")
        if problems:
            raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))
        load_full_states(self.model, self.optimizer, checkpoint.model_state, checkpoint.optimizer_state,
                         self.sharded)
        self.scheduler.load_state_dict(checkpoint.scheduler_state)
        recompute_learning_rate(self.scheduler)  # the schedule of this run's total steps
        set_rng_state(checkpoint.rng_state)
        self.step = state["step"]
        self.run_id = state.get("run_id") or uuid.uuid4().hex
        self.session = latest_session(checkpoints_dir) + 1
        self._saved = (self.step, path)
        if state.get("total_steps", self.total_steps) != self.total_steps and self.step < self.total_steps \
                and self.config.lr_schedule != "constant":
            log.warning("the run had %d steps and now has %d: its %s learning-rate schedule is recomputed for %d "
                        "steps, so step %d uses %.4g instead of %.4g", state["total_steps"], self.total_steps,
                        self.config.lr_schedule, self.total_steps, self.step + 1,
                        self.optimizer.param_groups[0]["lr"], checkpoint.optimizer_state["param_groups"][0]["lr"])
        log.info("resumed from %s at step %d", path, self.step)
        return path

    # -- the loop -------------------------------------------------------------------------------------
    def _progress(self, iterable=None, **kwargs):
        if not self.config.progress_bar or not self.dp.is_main:
            return iterable if iterable is not None else _NullBar()
        from tqdm.auto import tqdm
        return tqdm(iterable, dynamic_ncols=True, **kwargs)

    def train(self, *, resume=False, stop_after_step: Optional[int] = None) -> dict:
        """Run to `total_steps` (or stop after `stop_after_step`, leaving a checkpoint to resume from).
        Returns the last held-out metrics (or the last training metrics without an eval split; {}
        when a resumed run had nothing left to do).

        resume: False for a new run, which refuses an `output_dir` holding another run's outputs;
            True to continue from the newest intact checkpoint; or the path of a checkpoint.
        A first SIGINT or SIGTERM ends the step under way, writes a checkpoint and raises
        `TrainingInterrupted`; a second one raises `StoppedAtOnce` at once (see interrupts.py)."""
        with StopRequests() as stop:
            return self._train(stop, resume, stop_after_step)

    def _train(self, stop: StopRequests, resume, stop_after_step: Optional[int]) -> dict:
        config = self.config
        resumed = self.resume(None if resume is True else resume) if resume else None
        if not resumed:
            refuse_another_run(self.output_dir, include_record=False)
            self.dp.barrier()  # every rank has looked before rank 0 writes
            self.run_id, self.session = uuid.uuid4().hex, 0
            torch.manual_seed(config.seed)
        elif self.step == self.total_steps and (self.output_dir / "model").is_dir():
            log.info("the run in %s finished at step %d: nothing left to do", self.output_dir, self.step)
            return {}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_log = (MetricsLog(self.output_dir / "metrics.jsonl", resume_step=self.step if resumed else None)
                       if self.dp.is_main else _NullLog())
        self.prepare_reference()
        self.model.train()
        last_eval = {}
        if not resumed:
            last_eval = self._log_eval(metrics_log)
        bar = self._progress(total=self.total_steps, initial=self.step, desc="train", unit="step")
        end = self.total_steps if stop_after_step is None else min(self.total_steps, stop_after_step)
        started, first_step, last = time.perf_counter(), self.step, {}
        while self.step < end:
            last = self._train_step()
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                metrics_log.write(self.step, "train", last)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}")
            if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                last_eval = self._log_eval(metrics_log, bar)
            if config.save_every and self.step % config.save_every == 0 and self.step < end:
                self.save_checkpoint()
            if self._stop_requested(stop):
                bar.close()
                raise TrainingInterrupted(stop.signum, self.step, self._checkpoint_now())
        bar.close()
        self._checkpoint_now()
        if self.step < self.total_steps:
            return last
        last_eval = self._log_eval(metrics_log) or last_eval
        self.save_model(self.output_dir / "model")
        if self.dp.is_main:
            log.info("trained %d steps in %.1f s", self.step - first_step, time.perf_counter() - started)
            if config.plots:
                from .plots import plot_metrics
                plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "plots" / "training.png")
        self.dp.barrier()
        return last_eval or last

    def _stop_requested(self, stop: StopRequests) -> bool:
        """Whether a signal asked to stop, on any rank (all ranks stop at the same step)."""
        requested = stop.signum is not None
        if self.dp.active:
            requested = self.dp.sum_values({"stop": float(requested)}, self.device)["stop"] > 0
            if requested and stop.signum is None:
                stop.signum = signal.SIGTERM  # another rank was signalled
        return requested

    def _log_eval(self, metrics_log: MetricsLog, bar=None) -> dict:
        metrics = self.evaluate()
        if metrics and self.dp.is_main:
            metrics_log.write(self.step, "eval", metrics)
            message = (f"step {self.step}: held-out loss {metrics['loss']:.4f}, reward accuracy "
                       f"{metrics['rewards/accuracies']:.3f}, margin {metrics['rewards/margins']:.4f}")
            (bar.write if bar is not None and hasattr(bar, "write") else log.info)(message)
        return metrics

    def save_model(self, directory: Path) -> Path:
        """`save_pretrained` of the policy (safetensors) and the tokenizer into `directory`; called
        on every rank (the state dict is gathered when sharded), written by rank 0."""
        directory = Path(directory)
        state = full_model_state(self.model, self.sharded) if self.sharded else None
        if self.dp.is_main:
            self.model.save_pretrained(directory, state_dict=state)
            self.tokenizer.save_pretrained(directory)
        return directory


class _NullLog:
    def write(self, step, split, metrics):
        pass


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass

