"""The training loop: one code path for every precision, task, transform and number of processes."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from tqdm.auto import tqdm

from gearshift.config import Config, load_config
from gearshift.rundir import RunPaths, create_run_dir, write_run_config
from gearshift.schedules import build_lr_scheduler
from gearshift.train import setup
from gearshift.train.callbacks import Callback, CallbackList
from gearshift.train.checkpointing import Checkpoints
from gearshift.train.dynamics import PhaseDriver
from gearshift.train.evaluate import Evaluator
from gearshift.train.faults import install_nan_fault, install_oom_fault
from gearshift.train.interrupt import StopRequest, TrainingInterrupted
from gearshift.train.logger import RunLogger
from gearshift.train.memory import (
    PEAK_METRIC,
    enable_gradient_checkpointing,
    peak_memory_mb,
    process_peak_mb,
    run_peak_mb,
)
from gearshift.train.recovery import Recovery
from gearshift.train.state import TrainState
from gearshift.train.strategy import build_strategy
from gearshift.train.stream import BatchStream
from gearshift.train.task import LossFnTask, Task
from gearshift.transforms import TransformChain, build_transforms


@dataclass
class RunResult:
    """What a finished (or gracefully stopped) run leaves behind."""

    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    final_dir: Path | None = None
    interrupted: bool = False


class Trainer:
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
        audit: where each non-default config value came from (``overrides.json``).
        task: the :class:`~gearshift.train.task.Task` defining loss, evaluation and task state
            (default: ``loss_fn`` as a task; give one or the other).
        transforms: the model transforms (default: those the config enables, e.g. LoRA).

    Example:
        >>> trainer = Trainer(model, dataset, {"training": {"max_steps": 100}})
        >>> result = trainer.fit()
    """

    def __init__(self, model: nn.Module, train_data: Sequence[Any], config: Config | Mapping | str | Path,
                 loss_fn: Callable[..., torch.Tensor] | None = None,
                 eval_data: Sequence[Any] | None = None, callbacks: Iterable[Callback] = (), *,
                 run_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 tokenizer: Any = None, collate_fn: Callable[[list[Any]], Any] | None = None,
                 audit: dict[str, Any] | None = None, task: Task | None = None,
                 transforms: TransformChain | None = None) -> None:
        if task is not None and loss_fn is not None:
            raise TypeError("pass either loss_fn or task to the Trainer, not both: a task "
                            "defines its own loss")
        self.config = config if isinstance(config, Config) else load_config(config)
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.task = task if task is not None else LossFnTask(self.config, loss_fn)
        self.transforms = transforms if transforms is not None else build_transforms(self.config)
        self.callbacks = CallbackList(callbacks)
        self.tokenizer = tokenizer
        self.collate_fn = collate_fn
        self.audit = audit
        self._run_dir_arg = Path(run_dir) if run_dir is not None else None
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.should_stop = False
        self._losses_since_eval: list[float] = []
        self._logged_at_resume: tuple[int, set[str]] = (-1, set())
        self.run_dir: Path | None = None

    @property
    def step(self) -> int:
        """Optimizer updates done so far."""
        return self.state.step

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        cfg, t = self.config, self.config.training
        set_seed(cfg.seed)
        self.strategy = build_strategy(cfg.distributed)
        self.accelerator = acc = setup.make_accelerator(t.precision, self.strategy)
        self.is_main = acc.is_main_process
        self.model = self.transforms.apply(self.model)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        optimizer = setup.build_optimizer(self.model, cfg)
        self.model, self.optimizer = self.strategy.prepare(acc, self.model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.stream = BatchStream(self.train_data, batch_size=t.batch_size,
                                  accumulate=t.accumulate_grad_batches, seed=cfg.seed,
                                  drop_last=t.drop_last, rank=acc.process_index,
                                  world_size=acc.num_processes, collate_fn=self.collate_fn)
        total_steps, length, warmup = setup.schedule_lengths(cfg, self.stream.steps_per_epoch)
        s = cfg.schedule
        self.scheduler = build_lr_scheduler(
            self.optimizer, s.name, total_steps=length, warmup_steps=warmup,
            min_lr_ratio=s.min_lr_ratio, warmup_start_factor=s.warmup_start_factor, **s.options)
        raw = self.raw_model
        self.dynamics = PhaseDriver(
            self.transforms.phase_controller(cfg.phases),
            set_alphas=lambda ctl: self.transforms.set_alphas(raw, ctl),
            set_lr_scale=lambda scale: self.scheduler.set_scale("phase", scale),
            log_event=lambda *a, **k: self.logger.log_event(*a, **k), say=self._print,
            model=raw)
        self.dynamics.apply()
        self.state = TrainState(self.stream, self.scheduler, self.dynamics, self.task,
                                self.callbacks, acc.scaler, seed=cfg.seed, total_steps=total_steps,
                                schedule_interval=s.interval, transforms=self.transforms)
        self.recovery = Recovery(cfg.recovery, self.state,
                                 lambda *a, **k: self.logger.log_event(*a, **k),
                                 self._roll_back, self._print)
        self.evaluator = Evaluator(self.model, self.task, acc, t.batch_size, self.collate_fn,
                                   self.recovery)
        if cfg.faults.oom_when_batch_above is not None:
            install_oom_fault(self.raw_model, cfg.faults.oom_when_batch_above)
        if cfg.faults.nan_at_steps:
            install_nan_fault(self.raw_model, cfg.faults.nan_at_steps,
                              lambda: (self.state.step + 1, self.state.attempts))
        self._open_run_dir()
        self.ckpt = Checkpoints(RunPaths(self.run_dir).checkpoints, cfg.checkpoint, self.state,
                                acc, self.raw_model, self.optimizer, self.transforms,
                                self._print, write_delay_s=cfg.faults.checkpoint_write_delay_s,
                                strategy=self.strategy)
        self.ckpt.on_commit = lambda path: self.callbacks.fire("on_checkpoint", self, path)
        resumed = self.ckpt.resume(self.resume_from) if self.resume_from is not None else None
        lg = cfg.logging
        self.logger = RunLogger(self.run_dir, tensorboard=lg.tensorboard, wandb=lg.wandb,
                                wandb_project=lg.wandb_project, run_name=self.run_dir.name,
                                enabled=self.is_main,
                                purge_step=self.step + 1 if resumed else None,
                                config=cfg.model_dump(mode="json"))
        self.ckpt.logger = self.logger
        self._sync_transforms()
        if resumed is not None:
            self._logged_at_resume = (self.step, self.logger.truncate_after(self.step))
            self.logger.log_event(self.step, "resume", checkpoint=str(resumed[0]),
                                  skipped_corrupt=resumed[1], notes=resumed[2])
        else:
            self.logger.log_event(0, "start", total_steps=total_steps,
                                  steps_per_epoch=self.stream.steps_per_epoch,
                                  processes=acc.num_processes, **self.strategy.describe())

    def _open_run_dir(self) -> None:
        if self._run_dir_arg is None and self.resume_from is not None:
            self._run_dir_arg = self.resume_from
        self.run_dir = self._run_dir_arg
        if self.run_dir is None:
            # One run directory for all processes: the main process names it, the others follow.
            cfg = self.config
            name = [str(create_run_dir(cfg.output_dir, cfg.name)) if self.is_main else None]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(name)
            self.run_dir = Path(name[0])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            write_run_config(self.run_dir, self.config, self.audit if self.audit else {})

    def _roll_back(self) -> Path | None:
        path = self.ckpt.load_newest()[0]
        if path is not None:
            self.logger.truncate_after(self.step)
            self._sync_transforms()
        return path

    def _sync_transforms(self) -> None:
        """Let the transforms set up the next step (e.g. the quantization strength)."""
        self._transform_metrics = self.transforms.on_step(self.raw_model, self.state.step,
                                                          self.dynamics.controller)

    # ------------------------------------------------------------------ the step

    def train_step(self, window: list[Any]) -> dict[str, float] | None:
        """One optimizer step over an accumulation window. None when the step was skipped."""
        acc, s, t = self.accelerator, self.state, self.config.training
        local_units, total_units = self._window_units(window)
        s.attempts += 1
        s.count_window(window, acc.num_processes)
        # Each micro-batch's summed loss is divided by the units of the *whole* window (all
        # ranks), so accumulation equals one big batch, short last windows included. DDP
        # averages gradients over ranks, hence the world-size factor.
        scale = acc.num_processes / max(total_units, 1)
        loss_sum = self.recovery.retry(lambda: self._backward(window, scale), window,
                                       self.optimizer)
        if loss_sum is None:
            return None  # one sample does not fit in memory: skipped
        self._local = (loss_sum.clone(), local_units)  # read lazily: no extra sync per step
        if acc.num_processes > 1:
            loss_sum = acc.reduce(loss_sum, "sum")
        step_loss = float(loss_sum) / max(total_units, 1)
        clip = t.grad_clip or 0.0
        max_norm = clip if t.grad_clip_algorithm == "norm" and clip > 0 else math.inf
        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
        if t.grad_clip_algorithm == "value" and clip > 0:
            torch.nn.utils.clip_grad_value_(self.params, clip)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            # Skipped: no update, and neither the schedule nor the phase statistics count it.
            self.optimizer.zero_grad(set_to_none=True)
            self.recovery.nonfinite(step_loss, grad_norm)
            return None
        self.recovery.step_done()
        stability = self.dynamics.stability(acc)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
            self.logger.log_event(s.step, "fp16_overflow_skip", loss=step_loss)
            return None
        s.step += 1
        task_metrics = self.task.after_optimizer_step(s.step)
        phase_metrics = self.dynamics.after_step(s.step, step_loss, stability)
        if s.schedule_interval == "step":
            self.scheduler.step()
        transform_metrics = self._transform_metrics  # what this step ran with
        self._sync_transforms()
        return {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, **self._extra(total_units),
                **task_metrics, **phase_metrics, **transform_metrics}

    def _window_units(self, window: list[Any]) -> tuple[int, int]:
        local = sum(self.task.units(b) for b in window)
        if self.accelerator.num_processes == 1:
            return local, local
        acc = self.accelerator
        return local, int(acc.reduce(torch.tensor(local, device=acc.device), "sum"))

    def _backward(self, window: list[Any], scale: float) -> torch.Tensor:
        acc, model = self.accelerator, self.model
        pieces = [piece for batch in window for piece in self.recovery.pieces(batch)]
        self.task.start_attempt()
        loss_sum = torch.zeros((), device=acc.device)
        self._metric_sums: dict[str, torch.Tensor] = {}
        for i, cpu_batch in enumerate(pieces):
            batch = setup.to_device(cpu_batch, acc.device)
            is_accumulating = i < len(pieces) - 1
            sync = acc.no_sync(model) if is_accumulating and acc.num_processes > 1 else nullcontext()
            with sync:
                out = self.task.loss(model, batch)
                acc.backward(out.loss * scale)
            loss_sum += out.loss.detach().float()
            for key, value in out.metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32).detach()
                self._metric_sums[key] = self._metric_sums.get(key, 0.0) + value
        return loss_sum

    def _extra(self, total_units: int) -> dict[str, float]:
        """The task's extra metrics of the step, per unit (summed over ranks)."""
        if not self._metric_sums:
            return {}
        acc = self.accelerator
        out = {}
        for key, value in self._metric_sums.items():
            if acc.num_processes > 1:
                value = acc.reduce(value.to(acc.device), "sum")
            out[key] = float(value) / max(total_units, 1)
        return out

    @property
    def local_loss(self) -> float:
        """This process's own loss of the last step (before the cross-rank reduction)."""
        total, units = self._local
        return float(total) / max(units, 1)

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation of the eval set (by default loss and perplexity), with the
        transforms' own metrics."""
        metrics = self.evaluator(self.eval_data)
        if metrics:
            metrics.update(self.transforms.eval_metrics(self.raw_model))
        return metrics

    # ------------------------------------------------------------------ the loop

    def fit(self) -> RunResult:
        """Train until the configured length (or a stop), checkpointing along the way."""
        self._setup()
        cfg, t, s = self.config, self.config.training, self.state
        self.model.train()
        self.callbacks.fire("on_train_start", self)
        if s.initial_eval is None:
            s.initial_eval = self.evaluate()
            if s.initial_eval:
                self.logger.log_metrics(0, s.initial_eval)
                self.callbacks.fire("on_eval", self, s.initial_eval)
        bar = tqdm(total=s.total_steps, initial=s.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.logging.progress_bar and self.is_main), file=sys.stderr)
        interval_start, interval_tokens, interval_losses = time.perf_counter(), s.tokens_seen, []
        interrupted: int | None = None
        try:
            with StopRequest() as stop:
                while s.step < s.total_steps:
                    self.ckpt.poll()  # a background save committed (or failed) meanwhile
                    window, epoch_ended = self.stream.next_window()
                    metrics = self.train_step(window)
                    if epoch_ended:
                        if s.schedule_interval == "epoch":
                            self.scheduler.step()
                        self.callbacks.fire("on_epoch_end", self, s.epoch - 1)
                    if metrics is None:
                        continue
                    interval_losses.append(metrics["loss"])
                    self._losses_since_eval.append(metrics["loss"])
                    metrics["epoch"] = s.epoch
                    if s.step % t.log_every == 0 or s.step == s.total_steps:
                        now = time.perf_counter()
                        metrics["tokens_per_s"] = (s.tokens_seen - interval_tokens) / max(
                            now - interval_start, 1e-9)
                        metrics["loss_avg"] = sum(interval_losses) / len(interval_losses)
                        metrics[PEAK_METRIC] = peak_memory_mb(self.accelerator)
                        interval_start, interval_tokens, interval_losses = now, s.tokens_seen, []
                        self.logger.log_metrics(s.step, metrics)
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                        tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                    bar.update(1)
                    self.callbacks.fire("on_step_end", self, metrics)
                    if t.eval_every and s.step % t.eval_every == 0 and s.step < s.total_steps:
                        self._run_eval()
                    stopping = stop.signum is not None or self.should_stop
                    if cfg.checkpoint.enabled and (s.step % cfg.checkpoint.every == 0 or stopping):
                        self.save_checkpoint(wait=stopping)  # a stop waits for the writer
                    if stop.signum is not None:
                        interrupted = stop.signum
                        break
                    if self.should_stop:
                        self.logger.log_event(s.step, "stop", reason="callback")
                        break
        except BaseException:
            # A checkpoint already being written is finished, not torn (a second Ctrl-C too:
            # it only skips writing a new one).
            self.ckpt.drain()
            raise
        finally:
            bar.close()
        if interrupted is not None:
            self.ckpt.drain()
            last_ckpt = self.ckpt.last
            where = f"checkpoint {last_ckpt}" if last_ckpt else "no checkpoint (disabled)"
            msg = (f"stopped at step {s.step}/{s.total_steps}; {where}. "
                   f"Resume with: gearshift resume {self.run_dir}")
            self.logger.log_event(s.step, "interrupted", signal=interrupted,
                                  peak_memory_mb=process_peak_mb(self.accelerator.device))
            self.logger.close()
            raise TrainingInterrupted(msg, interrupted)
        return self._finish()

    def _run_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        step, logged = self._logged_at_resume
        if step == self.step and any(key.startswith("eval/") for key in logged):
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

    def save_checkpoint(self, wait: bool = True) -> Path | None:
        """Checkpoint the current step (main process writes): the committed folder, or None
        while ``checkpoint.async`` writes it in the background and ``wait`` is False.
        ``on_checkpoint`` fires once it is committed."""
        return self.ckpt.save(wait=wait)

    def _finish(self) -> RunResult:
        assert self.run_dir is not None
        final_eval = self._run_eval()  # overlaps with a checkpoint still being written
        self.ckpt.finish()
        if self.config.checkpoint.enabled and self.ckpt.last_step != self.step:
            self.save_checkpoint()
        last_ckpt = self.ckpt.last
        final_dir = self.ckpt.export_final(RunPaths(self.run_dir).final, self.tokenizer)
        metrics: dict[str, float] = {}
        if self.state.initial_eval and "eval/loss" in self.state.initial_eval:
            metrics["eval/loss_before"] = self.state.initial_eval["eval/loss"]
        metrics.update(final_eval)
        metrics[PEAK_METRIC] = run_peak_mb(self.run_dir, self.accelerator)
        self.logger.log_event(self.step, "end", **metrics,
                              peak_memory_mb=process_peak_mb(self.accelerator.device))
        self.logger.close()
        self.ckpt.drain()  # retention of the last checkpoint, still in the writer's thread
        self.accelerator.wait_for_everyone()  # no rank leaves while another still exports
        result = RunResult(self.run_dir, self.step, metrics, last_ckpt, final_dir)
        self.callbacks.fire("on_train_end", self, result)
        return result

    def _print(self, message: str) -> None:
        if getattr(self, "is_main", True):
            print(message, file=sys.stderr, flush=True)
