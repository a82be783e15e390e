"""gearshift in a Lightning project: exact LR schedules, the phase controller, gradient stability.

Three drop-in pieces for ``lightning.pytorch`` (``pip install 'gearshift[lightning]'``):

* :func:`configure_lr_scheduler` — the ``lr_scheduler`` entry of ``configure_optimizers`` for any
  gearshift schedule, the ``plateau`` one included (it really reduces the LR on the monitored
  metric, see :class:`MonitoredLR`).
* :class:`GradientSignCallback` — measures gradient-sign stability once per optimizer step.
* :class:`PhaseSchedulerCallback` — feeds the phase controller once per optimizer step with the
  step's loss (and the stability, when a :class:`GradientSignCallback` is there), both averaged
  over ranks, and puts each phase's LoRA alphas and LR scale in force.

Both callbacks keep their state in Lightning checkpoints (``Callback.state_dict``), so
``Trainer.fit(ckpt_path=...)`` continues with the same decisions as a run that never stopped.

Example:
    >>> import lightning.pytorch as pl  # doctest: +SKIP
    >>> class Module(pl.LightningModule):  # doctest: +SKIP
    ...     def configure_optimizers(self):
    ...         opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
    ...         return {"optimizer": opt, "lr_scheduler": configure_lr_scheduler(
    ...             opt, name="warmup_cosine", total_steps=1000, warmup_steps=50)}
    >>> phases = {"window": 100, "phases": [{"name": "foundation", "alpha": 8},
    ...                                     {"name": "emphasis", "alpha": 16}]}
    >>> trainer = pl.Trainer(callbacks=[GradientSignCallback(),  # doctest: +SKIP
    ...                                 PhaseSchedulerCallback(phases)])
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_info
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gearshift.integrations.lightning needs Lightning (lightning>=2.2), which could not be "
        f"imported ({exc}). Install it with: pip install 'gearshift[lightning]'"
    ) from exc

from gearshift.errors import CheckpointError, Problem
from gearshift.integrations._common import (
    PhaseLRScale,
    build_controller,
    lora_alphas,
    lora_target,
)
from gearshift.phases import PhaseScheduler
from gearshift.schedules import GearshiftLR, ScheduleError, build_schedule
from gearshift.signals import GradientSignTracker, reduce_signal, resolve_loss
from gearshift.train.dynamics import PhaseDriver

__all__ = [
    "GradientSignCallback",
    "MonitoredLR",
    "PhaseSchedulerCallback",
    "configure_lr_scheduler",
]

_STATE_VERSION = 1
INTERVALS: tuple[str, ...] = ("step", "epoch")


def _check_version(state: Any, what: str) -> None:
    version = state.get("version") if isinstance(state, dict) else None
    if version != _STATE_VERSION:
        raise CheckpointError(f"the checkpoint's {what} state has version {version!r}; this "
                              f"gearshift reads version {_STATE_VERSION}")


class MonitoredLR(GearshiftLR):
    """A :class:`~gearshift.schedules.GearshiftLR` whose ``step(metrics)`` also reports a metric.

    Lightning hands the monitored value only to schedulers flagged ``reduce_on_plateau``, and then
    calls ``scheduler.step(value)``; torch's base ``step`` would take that value for an *epoch*
    number. Here ``step(metrics)`` first reports the metric of the interval that just ended
    (:meth:`~gearshift.schedules.GearshiftLR.report`: ignored during the warmup) and then advances
    the clock by one, so the LR after ``k`` calls is still the closed form times the plateau
    factor.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = MonitoredLR(opt, build_schedule("plateau", total_steps=10, patience=0))
        >>> for _ in range(2):
        ...     opt.step(); sched.step(1.0)
        >>> sched.get_last_lr()
        [0.5]
    """

    def step(self, metrics: float | Tensor | None = None, epoch: None = None) -> None:  # type: ignore[override]
        """Report ``metrics`` (when given), then advance one interval."""
        if epoch is not None:
            raise TypeError("MonitoredLR.step() takes no epoch: the LR is a function of its count")
        if metrics is not None:
            self.report(float(metrics))
        super().step()


def configure_lr_scheduler(
    optimizer: Optimizer,
    *,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    warmup_start_factor: float = 0.0,
    interval: str | None = None,
    frequency: int = 1,
    monitor: str | None = None,
    strict: bool = True,
    **shape_kwargs: Any,
) -> dict[str, Any]:
    """The ``lr_scheduler`` entry of ``configure_optimizers`` for a gearshift schedule.

    After ``k`` scheduler steps every param group's LR is its initial LR times
    ``lr_multiplier(name, k, ...)`` — computed in closed form each time, so a resumed run
    (``fit(ckpt_path=...)``) follows exactly the same LRs. ``total_steps`` and ``warmup_steps``
    count scheduler steps: optimizer steps with ``interval="step"`` (with gradient
    accumulation, Lightning steps the scheduler once per optimizer step), epochs with
    ``interval="epoch"``, each divided by ``frequency``.

    The ``plateau`` schedule (alias ``Adaptive``) needs ``monitor``: the entry is flagged
    ``reduce_on_plateau`` so that Lightning passes the monitored value, which lowers the LR when
    it stalls (see :class:`MonitoredLR`); its ``interval`` defaults to ``"epoch"`` (one report per
    epoch, e.g. of ``val_loss``), every other schedule's to ``"step"``. As with torch's
    ``ReduceLROnPlateau`` in Lightning, each scheduler step reports the metric's current value:
    with ``interval="step"``, a metric logged once per validation is reported again at every
    step until the next validation (set ``frequency`` to the validation interval).

    Args:
        optimizer: The optimizer returned next to this entry.
        name: Schedule name (``gearshift.schedules.SCHEDULES``, case-insensitive, aliases too).
        total_steps: Length of the schedule in scheduler steps.
        warmup_steps: Linear warmup length in scheduler steps.
        min_lr_ratio: Floor of the multiplier.
        warmup_start_factor: Multiplier at the first warmup step.
        interval: ``"step"`` or ``"epoch"``; see above for the default.
        frequency: Step the scheduler every ``frequency`` intervals.
        monitor: Logged metric the ``plateau`` schedule watches (required there, and only there).
        strict: ``plateau`` only: fail when the monitored metric is missing (Lightning's rule);
            ``False`` skips that report with a warning.
        **shape_kwargs: The schedule's own options (``patience``, ``factor``, ``power``, ...).

    Returns:
        ``{"scheduler": ..., "interval": ..., "frequency": ...}``, plus ``"monitor"``,
        ``"reduce_on_plateau": True`` and ``"strict"`` for ``plateau``.

    Raises:
        ScheduleError: (a ``ValueError``) listing every invalid argument at once.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> entry = configure_lr_scheduler(opt, name="warmup_cosine", total_steps=100,
        ...                                warmup_steps=10)
        >>> entry["interval"], entry["frequency"], entry["scheduler"].get_last_lr()
        ('step', 1, [0.0])
    """
    problems: list[Problem] = []
    try:
        schedule = build_schedule(
            name, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
            warmup_start_factor=warmup_start_factor, **shape_kwargs)
    except ScheduleError as err:
        problems.extend(err.problems)
        schedule = None
    plateau = schedule is not None and schedule.name == "plateau"
    if interval is None:
        interval = "epoch" if plateau else "step"
    if interval not in INTERVALS:
        problems.append(Problem("interval", f"must be one of {list(INTERVALS)}, got {interval!r}"))
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        problems.append(Problem("frequency", f"must be an integer >= 1, got {frequency!r}"))
    if plateau and not (isinstance(monitor, str) and monitor):
        problems.append(Problem("monitor", "the 'plateau' schedule needs the name of a logged "
                                "metric to watch, e.g. monitor='val_loss'"))
    if schedule is not None and not plateau and monitor is not None:
        problems.append(Problem("monitor", f"only the 'plateau' schedule watches a metric; "
                                f"{schedule.name!r} depends on the step count alone: drop "
                                "monitor"))
    if problems:
        raise ScheduleError(problems, source="configure_lr_scheduler")
    assert schedule is not None  # every failure to build it was reported above
    entry: dict[str, Any] = {"interval": interval, "frequency": frequency}
    if plateau:
        entry.update(scheduler=MonitoredLR(optimizer, schedule), monitor=monitor,
                     reduce_on_plateau=True, strict=bool(strict))
    else:
        entry["scheduler"] = GearshiftLR(optimizer, schedule)
    return entry


class GradientSignCallback(Callback):
    """Gradient-sign stability, measured once per optimizer step (Lightning callback).

    In ``on_before_optimizer_step`` — after the last micro-batch's backward and after AMP
    unscaling — a :class:`~gearshift.signals.GradientSignTracker` over the module's trainable
    parameters compares each gradient element's sign with its sign at the previous step; the
    fraction that agrees is averaged over ranks. A :class:`PhaseSchedulerCallback` in the same
    trainer feeds it to the controller. The sign buffers (1 byte per trainable element) are part
    of the callback's checkpoint state.

    Args:
        log: Log the value as ``name`` (``pl_module.log``, on step).
        name: The logged metric's name.

    Attributes:
        stability: The latest value (``None`` before the second step).
        measured_at: ``trainer.global_step`` when it was measured (the step being taken).
        tracker: The tracker, created when fitting starts.
    """

    def __init__(self, *, log: bool = True, name: str = "grad_stability") -> None:
        self.log_metrics = log
        self.name = name
        self.tracker: GradientSignTracker | None = None
        self.stability: float | None = None
        self.measured_at: int | None = None
        self._pending: dict[str, Any] | None = None

    def _build(self, pl_module: pl.LightningModule) -> GradientSignTracker:
        if self.tracker is None:
            self.tracker = GradientSignTracker(
                [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad])
            if self._pending is not None:
                self.tracker.load_state_dict(self._pending)
                self._pending = None
        return self.tracker

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        value = reduce_signal(self._build(pl_module).update())
        self.stability, self.measured_at = value, trainer.global_step
        if self.log_metrics and value is not None:
            pl_module.log(self.name, value, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        if self.tracker is None:
            return {} if self._pending is None else {"version": _STATE_VERSION, **self._pending}
        return {"version": _STATE_VERSION, **self.tracker.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_version(state_dict, "gradient-sign callback")
        state = {k: v for k, v in state_dict.items() if k != "version"}
        if self.tracker is None:
            self._pending = state  # the tracker needs the module: restored in on_fit_start
        else:
            self.tracker.load_state_dict(state)


class PhaseSchedulerCallback(Callback):
    """Runs the gearshift phase controller inside a Lightning ``Trainer``.

    Once per optimizer step — detected as a change of ``trainer.global_step`` in
    ``on_train_batch_end``, so with ``accumulate_grad_batches`` only on the step's last
    micro-batch, and never for a step the AMP scaler skipped — the controller gets the step's
    loss (the mean of its micro-batches' losses, found in the ``training_step`` output by
    :func:`~gearshift.signals.resolve_loss`) and, when a :class:`GradientSignCallback` is in the
    trainer, the step's gradient-sign stability; both averaged across ranks first, so every rank
    makes the same decision on the same step. The step number given is ``trainer.global_step``.

    On a transition (and when training starts or resumes) the phase's alphas are put into the
    module's LoRA layers — the first PEFT model inside the ``LightningModule`` (e.g.
    ``self.model``), or the module itself if it holds LoRA layers — and a phase ``lr_scale`` is
    applied on top of a gearshift / ``LambdaLR`` scheduler (see
    :class:`~gearshift.integrations._common.PhaseLRScale`). With ``log=True`` the phase index and
    the alphas are logged each step as ``phase/index`` and ``alpha/<group>``.

    The controller's state is this callback's ``state_dict`` in every Lightning checkpoint; on
    ``fit(ckpt_path=...)`` it is restored, and a checkpoint without it starts at phase 0 with a
    warning. A micro-batch loss gathered before a checkpoint taken mid-accumulation is not
    saved (Lightning itself cannot resume mid-accumulation).

    Args:
        phases_config_or_scheduler: A ``phases:`` section (either schema, a mapping or a
            validated model) or a ready :class:`~gearshift.phases.PhaseScheduler`. ``None`` or
            ``enabled: false``: the callback does nothing and saves nothing.
        rank: LoRA rank for ``PhaseScheduler.get_scale`` when built from a config.
        log: Log the phase index and alphas through ``pl_module.log``.

    Attributes:
        controller: The :class:`~gearshift.phases.PhaseScheduler` (or ``None``).
        alphas: ``{group: alpha}`` in force.
        last_loss: The loss given at the latest step (``None`` when the step had none).
        last_stability: The stability given at the latest step.
    """

    def __init__(self, phases_config_or_scheduler: Any, *, rank: int | None = None,
                 log: bool = True) -> None:
        self.controller: PhaseScheduler | None = build_controller(phases_config_or_scheduler, rank)
        self.driver = PhaseDriver(self.controller,
                                  say=lambda line: rank_zero_info(f"gearshift: {line}"))
        self.log_metrics = log
        self.last_loss: float | None = None
        self.last_stability: float | None = None
        self._lr_scale = PhaseLRScale(self.controller)
        self._loss_sum: Tensor | None = None
        self._micro_batches = 0
        self._seen_step: int | None = None
        self._amp_scale: float | None = None
        self._signs: GradientSignCallback | None = None

    # ------------------------------------------------------------------ applying a phase

    @property
    def alphas(self) -> dict[str, float]:
        """``{group: alpha}`` in force."""
        return self.driver.alphas

    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = lora_target(pl_module)
        self.driver.set_alphas = lambda controller: lora_alphas(target, controller)
        self.driver.set_lr_scale = lambda scale: self._apply_lr(trainer)
        self.driver.apply()

    def _apply_lr(self, trainer: pl.Trainer) -> None:
        if self.controller is None or not self._lr_scale.active:
            return
        for optimizer in trainer.optimizers:
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs
                          if c.scheduler.optimizer is optimizer]
            self._lr_scale.apply(optimizer, schedulers[0] if schedulers else None,
                                 self.controller.current_lr_scale)

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self._loss_sum, self._micro_batches = None, 0
        self._signs = next((c for c in trainer.callbacks if isinstance(c, GradientSignCallback)),
                           None)
        if self.controller is not None:
            self._bind(trainer, pl_module)  # fresh start or resume: the phase in force now

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        # Schedulers reset the LR from their closed form when they step; the scale goes back on.
        self._apply_lr(trainer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._amp_scale = float(scaler.get_scale()) if scaler is not None else None

    def _step_was_skipped(self, trainer: pl.Trainer) -> bool:
        # torch's GradScaler lowers its scale exactly when it skipped the optimizer step.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        before, self._amp_scale = self._amp_scale, None
        return scaler is not None and before is not None and float(scaler.get_scale()) < before

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.controller is None:
            return
        loss = self._micro_loss(trainer, pl_module, outputs)
        if loss is not None:
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._micro_batches += 1
        step = trainer.global_step
        if step == self._seen_step:
            return  # still accumulating: the optimizer did not step on this batch
        self._seen_step = step
        total, count = self._loss_sum, self._micro_batches
        self._loss_sum, self._micro_batches = None, 0
        if self._step_was_skipped(trainer):
            return
        mean = float(total) / count if total is not None else None  # the one host sync
        self.last_loss = reduce_signal(mean)
        signs = self._signs
        self.last_stability = (signs.stability if signs is not None
                               and signs.measured_at == step - 1 else None)
        self.driver.update(step, self.last_loss, self.last_stability)
        if self.log_metrics:
            metrics = {"phase/index": float(self.controller.phase_index),
                       **{f"alpha/{g}": a for g, a in self.alphas.items()}}
            for key, value in metrics.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)

    @staticmethod
    def _micro_loss(trainer: pl.Trainer, pl_module: pl.LightningModule,
                    outputs: Any) -> Tensor | None:
        if outputs is None or (isinstance(outputs, dict) and not outputs):
            return None  # training_step returned None: Lightning skipped the batch on purpose
        loss = resolve_loss(outputs)
        if loss is None:
            return None
        loss = loss.detach().float()
        if pl_module.automatic_optimization:
            # Lightning hands back the loss divided by accumulate_grad_batches.
            loss = loss * trainer.accumulate_grad_batches
        return loss

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return {}
        return {"version": _STATE_VERSION, "phases": self.controller.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.controller is None:
            return
        _check_version(state_dict, "phase-scheduler callback")
        self.controller.load_state_dict(state_dict.get("phases"))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.controller is None:
            return
        states = checkpoint.get("callbacks") or {}
        if not states.get(self.state_key):
            warnings.warn(
                "the checkpoint holds no phase-controller state (written before phases were "
                f"enabled): starting at phase 0 ({self.controller.current_phase.name})",
                stacklevel=2,
            )
