"""The training loop: one code path for every precision, task and number of processes."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, set_seed
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from gearshift.checkpoint import CheckpointManager
from gearshift.config import Config, load_config
from gearshift.errors import CheckpointError
from gearshift.rundir import RunPaths, create_run_dir, write_run_config
from gearshift.schedules import build_lr_scheduler
from gearshift.train import setup
from gearshift.train.callbacks import Callback, CallbackList
from gearshift.train.dynamics import SIGNS, PhaseDriver
from gearshift.train.export import export_final
from gearshift.train.interrupt import StopRequest, TrainingDiverged, TrainingInterrupted
from gearshift.train.logger import RunLogger
from gearshift.train.memory import enable_gradient_checkpointing
from gearshift.train.recovery import RecoveryMixin, install_oom_fault, is_oom, split_batch
from gearshift.train.resume import ResumeMixin
from gearshift.train.stream import BatchStream

# safetensors reports I/O failures (disk full, permission denied) with its own error type.
STORAGE_ERRORS = (OSError, SafetensorError)


@dataclass
class RunResult:
    """What a finished (or gracefully stopped) run leaves behind."""

    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    final_dir: Path | None = None
    interrupted: bool = False


class Trainer(ResumeMixin, RecoveryMixin):
    """Trains any ``nn.Module`` with managed schedules, checkpoints and exact resume.

    Args:
        model: the module to train.
        train_data: a map-style dataset (``__len__`` / ``__getitem__``).
        config: a :class:`Config`, a dict, or a YAML path.
        loss_fn: ``loss_fn(model, batch) -> Tensor`` giving the batch's *mean* loss; or a
            :class:`~gearshift.tasks.TokenWeightedLoss` (summed loss + ``units(batch)``) for
            token-weighted accumulation. Default: the model's own ``loss`` output.
        eval_data: optional held-out dataset; evaluated every ``training.eval_every`` steps.
        callbacks: :class:`Callback` instances.
        run_dir: where to write the run (default: a new dir under ``output_dir``).
        resume_from: a run directory whose newest valid checkpoint to continue from.
        tokenizer: saved beside the model in ``final/`` when given.
        collate_fn: merges samples into a batch (default: torch's ``default_collate``).

    Example:
        >>> trainer = Trainer(model, dataset, {"training": {"max_steps": 100}})
        >>> result = trainer.fit()
    """

    def __init__(self, model: nn.Module, train_data: Sequence[Any], config: Config | Mapping | str | Path,
                 loss_fn: Callable[..., torch.Tensor] | None = None,
                 eval_data: Sequence[Any] | None = None, callbacks: Iterable[Callback] = (), *,
                 run_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 tokenizer: Any = None, collate_fn: Callable[[list[Any]], Any] | None = None,
                 audit: dict[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.loss_fn = loss_fn
        self.callbacks = CallbackList(callbacks)
        self.tokenizer = tokenizer
        self.collate_fn = collate_fn
        self.audit = audit
        self._run_dir_arg = Path(run_dir) if run_dir is not None else None
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.should_stop = False
        self.step = 0
        self._losses_since_eval: list[float] = []
        self._logged_at_resume: tuple[int, set[str]] = (-1, set())
        self.micro_limit: int | None = None  # set after an OOM: samples per forward pass
        self.consecutive_nonfinite = 0
        self.oom_skips = 0
        self.rollbacks = 0
        self.lr_factor = 1.0
        self.run_dir: Path | None = None

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        cfg = self.config
        set_seed(cfg.seed)
        self.accelerator = acc = setup.make_accelerator(cfg.training.precision)
        self.is_main = acc.is_main_process
        if cfg.lora.enabled:
            from gearshift.lora import attach_lora

            lc = cfg.lora
            self.model = attach_lora(self.model, r=lc.r, alpha=lc.alpha,
                                     target_modules=lc.target_modules, groups=lc.groups,
                                     use_rslora=lc.use_rslora, dropout=lc.dropout)
        if cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        optimizer = setup.build_optimizer(self.model, cfg)
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.dynamics = PhaseDriver(cfg, self.raw_model, None, self._print)
        self._nan_pending = Counter(cfg.faults.nan_at_steps)
        if cfg.faults.oom_when_batch_above is not None:
            install_oom_fault(self.raw_model, cfg.faults.oom_when_batch_above)
        t = cfg.training
        self.stream = BatchStream(self.train_data, batch_size=t.batch_size,
                                  accumulate=t.accumulate_grad_batches, seed=cfg.seed,
                                  drop_last=t.drop_last, rank=acc.process_index,
                                  world_size=acc.num_processes, collate_fn=self.collate_fn)
        self.total_steps, length, warmup = setup.schedule_lengths(cfg, self.stream.steps_per_epoch)
        s = cfg.schedule
        self.schedule_kwargs = dict(total_steps=length, warmup_steps=warmup,
                                    min_lr_ratio=s.min_lr_ratio,
                                    warmup_start_factor=s.warmup_start_factor, **s.options)
        self.scheduler = build_lr_scheduler(self.optimizer, s.name, **self.schedule_kwargs)

        if self._run_dir_arg is None and self.resume_from is not None:
            self._run_dir_arg = self.resume_from
        self.run_dir = self._run_dir_arg
        if self.run_dir is None:
            # One run directory for all processes: the main process names it, the others follow.
            name = [str(create_run_dir(cfg.output_dir, cfg.name)) if self.is_main else None]
            if acc.num_processes > 1:
                broadcast_object_list(name)
            self.run_dir = Path(name[0])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            audit = self.audit if self.audit is not None else {}
            write_run_config(self.run_dir, cfg, audit)
        self.ckpt = CheckpointManager(RunPaths(self.run_dir).checkpoints, keep_last=cfg.checkpoint.keep_last)
        self.samples_seen = 0
        self.tokens_seen = 0
        self.initial_eval: dict[str, float] | None = None
        resumed = self._maybe_resume() if self.resume_from is not None else None
        lg = cfg.logging
        self.logger = RunLogger(self.run_dir, tensorboard=lg.tensorboard, wandb=lg.wandb,
                                wandb_project=lg.wandb_project, run_name=self.run_dir.name,
                                enabled=self.is_main,
                                purge_step=self.step + 1 if resumed else None,
                                config=cfg.model_dump(mode="json"))
        self.dynamics.logger = self.logger
        if resumed is not None:
            self._logged_at_resume = (self.step, self.logger.truncate_after(self.step))
            self.logger.log_event(self.step, "resume", checkpoint=str(resumed[0]),
                                  skipped_corrupt=resumed[1], notes=resumed[2])
        else:
            self.logger.log_event(0, "start", total_steps=self.total_steps,
                                  steps_per_epoch=self.stream.steps_per_epoch)

    # ------------------------------------------------------------------ steps

    def _summed_loss(self, batch: Any) -> torch.Tensor:
        """The batch's loss summed over its units (see :meth:`_units`)."""
        fn = self.loss_fn
        if fn is not None and hasattr(fn, "units"):
            return fn(self.model, batch)
        if fn is not None:
            loss = fn(self.model, batch)
        else:
            out = self.model(**batch) if isinstance(batch, Mapping) else self.model(batch)
            loss = setup.output_loss(out)
        return loss * setup.batch_size_of(batch)

    def _units(self, batch: Any) -> int:
        fn = self.loss_fn
        return fn.units(batch) if fn is not None and hasattr(fn, "units") else \
            setup.batch_size_of(batch)

    def train_step(self, window: list[Any]) -> dict[str, float] | None:
        """One optimizer step over an accumulation window. None when the step was skipped."""
        acc = self.accelerator
        local_units = sum(self._units(b) for b in window)
        total_units = local_units
        if acc.num_processes > 1:
            total_units = int(acc.reduce(torch.tensor(local_units, device=acc.device), "sum"))
        # Each micro-batch's summed loss is divided by the units of the *whole* window (all
        # ranks), so accumulation equals one big batch, short last windows included. DDP
        # averages gradients over ranks, hence the world-size factor.
        scale = acc.num_processes / max(total_units, 1)
        for cpu_batch in window:  # counted once per window, however often it is re-run
            self.samples_seen += setup.batch_size_of(cpu_batch) * acc.num_processes
            self.tokens_seen += setup.tokens_of(cpu_batch) * acc.num_processes
        inject_nan = self._nan_pending[self.step + 1] > 0
        if inject_nan:
            self._nan_pending[self.step + 1] -= 1
        while True:
            try:
                loss_sum = self._backward_window(window, scale, inject_nan)
                break
            except Exception as exc:
                if not (self.config.recovery.oom and is_oom(exc)):
                    raise
                if not self._shrink_after_oom(window, exc):
                    return None
        self._local = (loss_sum.clone(), local_units)  # read lazily: no extra sync per step
        if acc.num_processes > 1:
            loss_sum = acc.reduce(loss_sum, "sum")
        step_loss = float(loss_sum) / max(total_units, 1)
        t = self.config.training
        clip = t.grad_clip or 0.0
        max_norm = clip if t.grad_clip_algorithm == "norm" and clip > 0 else math.inf
        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
        if t.grad_clip_algorithm == "value" and clip > 0:
            torch.nn.utils.clip_grad_value_(self.params, clip)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            # Skipped: no update, and neither the schedule nor the phase statistics count it.
            self.optimizer.zero_grad(set_to_none=True)
            self.consecutive_nonfinite += 1
            self.logger.log_event(self.step, "nonfinite_skip", loss=step_loss, grad_norm=grad_norm,
                                  consecutive=self.consecutive_nonfinite)
            if self.consecutive_nonfinite >= self.config.recovery.max_consecutive_nonfinite:
                self._rollback()
            return None
        self.consecutive_nonfinite = 0
        self.oom_skips = 0
        stability = self.dynamics.stability(acc)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
            self.logger.log_event(self.step, "fp16_overflow_skip", loss=step_loss)
            return None
        self.step += 1
        phase_metrics = self.dynamics.after_step(self.step, step_loss, stability)
        if self.config.schedule.interval == "step":
            self.scheduler.step()
        self._apply_lr_scale()
        return {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, **phase_metrics}

    def _backward_window(self, window: list[Any], scale: float, inject_nan: bool,
                         ) -> torch.Tensor:
        acc, model = self.accelerator, self.model
        pieces = window if self.micro_limit is None else [
            piece for batch in window for piece in split_batch(batch, self.micro_limit)]
        loss_sum = torch.zeros((), device=acc.device)
        for i, cpu_batch in enumerate(pieces):
            batch = setup.to_device(cpu_batch, acc.device)
            is_accumulating = i < len(pieces) - 1
            sync = acc.no_sync(model) if is_accumulating and acc.num_processes > 1 else nullcontext()
            with sync:
                loss = self._summed_loss(batch)
                if inject_nan and i == 0:
                    loss = loss * float("nan")
                acc.backward(loss * scale)
            loss_sum += loss.detach().float()
        return loss_sum

    @property
    def local_loss(self) -> float:
        """This process's own loss of the last step (before the cross-rank reduction)."""
        total, units = self._local
        return float(total) / max(units, 1)

    def _apply_lr_scale(self) -> None:
        # The phase's LR scale multiplies the closed-form schedule; re-applied after every step
        # because the scheduler recomputes the LR from its base each time.
        scale = self.dynamics.lr_scale
        if scale != 1.0:
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(),
                                 strict=True):
                group["lr"] = lr * scale

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss and perplexity over the whole eval set."""
        if self.eval_data is None or len(self.eval_data) == 0:
            return {}
        acc = self.accelerator
        self.model.eval()
        stream = BatchStream(self.eval_data, batch_size=self.config.training.batch_size,
                             shuffle=False, rank=acc.process_index, world_size=acc.num_processes,
                             collate_fn=self.collate_fn)
        total = torch.zeros((), device=acc.device, dtype=torch.float64)
        units = 0
        for _ in range(stream.batches_per_epoch):
            (cpu_batch,), _ = stream.next_window()
            units += self._units(cpu_batch)
            while True:
                try:
                    pieces = [cpu_batch] if self.micro_limit is None else \
                        split_batch(cpu_batch, self.micro_limit)
                    part = sum(self._summed_loss(setup.to_device(p, acc.device)).double()
                               for p in pieces)
                    break
                except Exception as exc:
                    if not (self.config.recovery.oom and is_oom(exc)):
                        raise
                    if not self._shrink_eval_after_oom(cpu_batch, exc):
                        raise TrainingDiverged(
                            "evaluation runs out of memory with one sample per forward pass; "
                            "lower data.max_eval_sequences or data.seq_len, or use bf16") from None
            total += part
        self.model.train()
        if acc.num_processes > 1:
            total = acc.reduce(total, "sum")
            units = int(acc.reduce(torch.tensor(units, device=acc.device), "sum"))
        loss = float(total) / max(units, 1)
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------ the loop

    def fit(self) -> RunResult:
        """Train until the configured length (or a stop), checkpointing along the way."""
        self._setup()
        cfg, t = self.config, self.config.training
        assert self.run_dir is not None
        self.model.train()
        self.callbacks.fire("on_train_start", self)
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()
            if self.initial_eval:
                self.logger.log_metrics(0, self.initial_eval)
                self.callbacks.fire("on_eval", self, self.initial_eval)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.logging.progress_bar and self.is_main), file=sys.stderr)
        last_ckpt: Path | None = None
        interval_start, interval_tokens, interval_losses = time.perf_counter(), self.tokens_seen, []
        interrupted: int | None = None
        try:
            with StopRequest() as stop:
                while self.step < self.total_steps:
                    window, epoch_ended = self.stream.next_window()
                    metrics = self.train_step(window)
                    if epoch_ended:
                        if cfg.schedule.interval == "epoch":
                            self.scheduler.step()
                        self.callbacks.fire("on_epoch_end", self, self.stream.position.epoch - 1)
                    if metrics is None:
                        continue
                    interval_losses.append(metrics["loss"])
                    self._losses_since_eval.append(metrics["loss"])
                    metrics["epoch"] = self.stream.position.epoch
                    if self.step % t.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        metrics["tokens_per_s"] = (self.tokens_seen - interval_tokens) / max(
                            now - interval_start, 1e-9)
                        metrics["loss_avg"] = sum(interval_losses) / len(interval_losses)
                        interval_start, interval_tokens, interval_losses = now, self.tokens_seen, []
                        self.logger.log_metrics(self.step, metrics)
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                        tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                    bar.update(1)
                    self.callbacks.fire("on_step_end", self, metrics)
                    if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                        self._run_eval()
                    stopping = stop.signum is not None or self.should_stop
                    if cfg.checkpoint.enabled and (self.step % cfg.checkpoint.every == 0 or stopping):
                        last_ckpt = self.save_checkpoint()
                    if stop.signum is not None:
                        interrupted = stop.signum
                        break
                    if self.should_stop:
                        self.logger.log_event(self.step, "stop", reason="callback")
                        break
        finally:
            bar.close()
        if interrupted is not None:
            where = f"checkpoint {last_ckpt}" if last_ckpt else "no checkpoint (disabled)"
            msg = (f"stopped at step {self.step}/{self.total_steps}; {where}. "
                   f"Resume with: gearshift resume {self.run_dir}")
            self.logger.log_event(self.step, "interrupted", signal=interrupted)
            self.logger.close()
            raise TrainingInterrupted(msg, interrupted)
        return self._finish(last_ckpt)

    def _run_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        step, logged = self._logged_at_resume
        if step == self.step and "eval/loss" in logged:
            return metrics  # logged (and reported) before the run was resumed at this step
        recent, self._losses_since_eval = self._losses_since_eval, []
        if self.scheduler.plateau is not None:
            # The plateau schedule watches the eval loss, or the train loss without eval data.
            value = metrics.get("eval/loss", sum(recent) / len(recent) if recent else None)
            if value is not None and self.scheduler.report(value):
                self.logger.log_event(self.step, "lr_reduced", metric=value,
                                      lr=self.optimizer.param_groups[0]["lr"])
        if metrics:
            self.logger.log_metrics(self.step, metrics)
            self.callbacks.fire("on_eval", self, metrics)
        return metrics

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (main process only)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            signs = self.dynamics.sign_tensors()
            weights: Any = self.raw_model
            if self.config.lora.enabled:  # the adapter only: the base is rebuilt from its source
                weights = {n: p for n, p in self.raw_model.named_parameters() if p.requires_grad}
            try:
                path = self.ckpt.save(self.step, model=weights, optimizer=self.optimizer,
                                      trainer_state=self.state_dict(),
                                      extra_tensors={SIGNS: signs} if signs else None)
            except STORAGE_ERRORS as exc:
                failure = [self._storage_failure(f"checkpoint of step {self.step}", exc)]
            else:
                failure = [None]
                self.logger.log_event(self.step, "checkpoint", path=str(path))
                self.callbacks.fire("on_checkpoint", self, path)
        else:
            failure = [None]
        self.accelerator.wait_for_everyone()
        if self.accelerator.num_processes > 1:
            broadcast_object_list(failure)  # every rank stops together, none waits forever
        if failure[0] is not None:
            raise CheckpointError(failure[0])
        return path

    def _finish(self, last_ckpt: Path | None) -> RunResult:
        assert self.run_dir is not None
        final_eval = self._run_eval()
        if self.config.checkpoint.enabled and (last_ckpt is None or last_ckpt.name !=
                                               RunPaths(self.run_dir).checkpoint(self.step).name):
            last_ckpt = self.save_checkpoint()
        final_dir = None
        if self.is_main:
            try:
                final_dir = export_final(self.raw_model, RunPaths(self.run_dir).final, self.tokenizer,
                                         adapter=self.config.lora.enabled)
            except STORAGE_ERRORS as exc:
                failure = self._storage_failure("final model export", exc)
                if failure is not None:
                    raise CheckpointError(failure) from exc
        metrics: dict[str, float] = {}
        if self.initial_eval:
            metrics["eval/loss_before"] = self.initial_eval["eval/loss"]
        metrics.update(final_eval)
        self.logger.log_event(self.step, "end", **metrics)
        self.logger.close()
        self.accelerator.wait_for_everyone()  # no rank leaves while another still exports
        result = RunResult(self.run_dir, self.step, metrics, last_ckpt, final_dir)
        self.callbacks.fire("on_train_end", self, result)
        return result

    def _storage_failure(self, what: str, exc: Exception) -> str | None:
        """Disk full / permission denied: the message to stop with, or None after a warning
        (``checkpoint.on_error: warn``)."""
        latest, _ = self.ckpt.find_latest_valid()
        kept = f"the previous checkpoint {latest.name} is intact" if latest else \
            "no earlier checkpoint exists"
        self.logger.log_event(self.step, "checkpoint_failed", what=what, error=str(exc))
        reason = getattr(exc, "strerror", None) or str(exc).split(": ")[-1]
        message = f"could not write the {what} in {self.run_dir} ({reason}); {kept}"
        if self.config.checkpoint.on_error == "warn":
            self._print(f"warning: {message}; training goes on (checkpoint.on_error: warn)")
            return None
        return (f"{message}. Free space or fix permissions, then run: gearshift resume "
                f"{self.run_dir}")

    def _print(self, message: str) -> None:
        if getattr(self, "is_main", True):
            print(message, file=sys.stderr, flush=True)
