"""`GearshiftLR`: a torch LR scheduler whose LR is a closed-form function of its step count.

The LR of every param group after ``k`` calls of :meth:`GearshiftLR.step` is
``base_lr * schedule.multiplier(k) * plateau factor * named scales`` (the plateau factor for
``plateau`` only; named scales such as a phase's ``lr_scale`` or a rollback's factor are set with
:meth:`GearshiftLR.set_scale`), computed from ``last_epoch`` each time rather than multiplied
onto the previous LR, so there is no float drift and a resumed run reproduces the uninterrupted
LR sequence exactly. The scheduler is the only writer of the optimizer's ``lr``: anything else
that wants another LR asks it through ``set_scale`` or ``report``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from gearshift.errors import Problem
from gearshift.schedules.base import Schedule
from gearshift.schedules.errors import ScheduleError, ScheduleStateError
from gearshift.schedules.plateau import Plateau, PlateauTracker
from gearshift.schedules.registry import SCHEDULES, build_schedule

STATE_KEYS: tuple[str, ...] = ("version", "name", "params", "last_epoch", "base_lrs", "plateau")
#: Optional in a saved state (states written before named scales existed have none).
SCALES_KEY = "scales"


def _checked_state(state: object, version: int) -> Mapping[str, Any]:
    # Everything that can be checked without a scheduler, so a bad state fails before any change.
    if not isinstance(state, Mapping):
        raise ScheduleStateError(f"scheduler state must be a dict, got {type(state).__name__}")
    if "version" not in state:
        raise ScheduleStateError(
            "scheduler state has no 'version'; it was not written by GearshiftLR.state_dict()"
        )
    if state["version"] != version:
        raise ScheduleStateError(
            f"scheduler state version {state['version']!r} is not supported (this version reads "
            f"{version}); resume with the gearshift version that wrote the checkpoint"
        )
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ScheduleStateError(f"scheduler state is missing {', '.join(missing)}")
    if state["name"] not in SCHEDULES:
        raise ScheduleStateError(f"scheduler state names unknown schedule {state['name']!r}")
    if not isinstance(state["params"], Mapping):
        raise ScheduleStateError("scheduler state 'params' must be a dict")
    last = state["last_epoch"]
    if isinstance(last, bool) or not isinstance(last, int) or last < 0:
        raise ScheduleStateError(
            f"scheduler state 'last_epoch' must be an integer >= 0, got {last!r}"
        )
    lrs = state["base_lrs"]
    if not isinstance(lrs, (list, tuple)) or not all(
        isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
        for lr in lrs
    ):
        raise ScheduleStateError("scheduler state 'base_lrs' must be a list of finite numbers")
    _checked_scales(state.get(SCALES_KEY, {}))
    return state


def _checked_scales(scales: object) -> dict[str, float]:
    if not isinstance(scales, Mapping) or not all(
        isinstance(k, str) and _is_scale(v) for k, v in scales.items()
    ):
        raise ScheduleStateError(
            "scheduler state 'scales' must map names to finite numbers >= 0"
        )
    return {str(k): float(v) for k, v in scales.items()}


def _is_scale(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


class GearshiftLR(LRScheduler):
    """Closed-form LR scheduler for any :class:`~gearshift.schedules.base.Schedule`.

    After ``k`` calls of :meth:`step` (``k = 0`` right after construction) every param group's LR
    is ``base_lr * schedule.multiplier(k)``. For the ``plateau`` schedule the LR is further
    multiplied by a factor that :meth:`report` lowers when the metric stalls, and every
    schedule multiplies in the named scales given to :meth:`set_scale` (e.g. ``"phase"`` and
    ``"rollback"``). All of them are in :meth:`state_dict`.

    Args:
        optimizer: The optimizer whose param groups' ``lr`` this scheduler sets.
        schedule: The shape, usually from :func:`~gearshift.schedules.build_schedule`.

    Example:
        >>> import torch
        >>> from gearshift.schedules import build_schedule
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = GearshiftLR(opt, build_schedule("linear", total_steps=4))
        >>> opt.step(); sched.step()
        >>> sched.get_last_lr()
        [0.75]
    """

    STATE_VERSION: ClassVar[int] = 1

    def __init__(self, optimizer: Optimizer, schedule: Schedule) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        # Set before super().__init__, which already computes the step-0 LR.
        self.schedule = schedule
        self.plateau = PlateauTracker(schedule) if isinstance(schedule, Plateau) else None
        self.scales: dict[str, float] = {}
        super().__init__(optimizer)

    def set_scale(self, name: str, value: float) -> None:
        """Set the named factor ``name`` of the LR (1 removes it); the new LR applies at once.

        Args:
            name: What the factor stands for, e.g. ``"phase"`` or ``"rollback"``.
            value: A finite factor ``>= 0``.

        Raises:
            ScheduleError: (a ``ValueError``) for a negative or non-finite value.

        Example:
            >>> import torch
            >>> from gearshift.schedules import build_lr_scheduler
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
            >>> sched = build_lr_scheduler(opt, "constant", total_steps=8)
            >>> sched.set_scale("phase", 0.5); opt.param_groups[0]["lr"]
            0.05
        """
        if not _is_scale(value):
            raise ScheduleError([Problem(f"scale.{name}", f"must be a finite number >= 0, got "
                                         f"{value!r}")], source="scheduler")
        value = float(value)
        if value == 1.0:
            self.scales.pop(name, None)
        else:
            self.scales[name] = value
        self._apply_lr()

    def scale(self, name: str) -> float:
        """The named factor ``name`` in force (1 when it was never set)."""
        return self.scales.get(name, 1.0)

    def current_multiplier(self) -> float:
        """Return the factor applied to every base LR at the current step.

        Example:
            >>> import torch
            >>> from gearshift.schedules import build_lr_scheduler
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
            >>> build_lr_scheduler(opt, "constant", total_steps=8, warmup_steps=4).current_multiplier()
            0.0
        """
        mult = self.schedule.multiplier(max(self.last_epoch, 0))
        if self.plateau is not None:
            mult *= self.plateau.current_factor
        for name in sorted(self.scales):  # a fixed order: the same float product every time
            mult *= self.scales[name]
        return mult

    def get_lr(self) -> list[float | Tensor]:
        """Return ``base_lr * current_multiplier()`` for every param group (closed form)."""
        mult = self.current_multiplier()
        return [base * mult for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        return self.get_lr()

    def _apply_lr(self) -> None:
        # Needed outside step(): report(), set_scale() and load_state_dict() change the LR
        # immediately.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(float(lr))
            else:
                group["lr"] = lr
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]

    def report(self, metric: float) -> bool:
        """Report a metric to the ``plateau`` schedule; return ``True`` if the LR was reduced.

        The new LR applies at once. Reports made during the warmup (``last_epoch < warmup_steps``)
        and NaN metrics are ignored and change nothing.

        Args:
            metric: The monitored value (a loss for ``mode="min"``).

        Raises:
            ScheduleError: (a ``ValueError``) if the schedule is not ``plateau``.

        Example:
            >>> import torch
            >>> from gearshift.schedules import build_lr_scheduler
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            >>> sched = build_lr_scheduler(opt, "plateau", total_steps=10, patience=0)
            >>> sched.report(1.0), sched.report(1.0), sched.get_last_lr()
            (False, True, [0.5])
        """
        if self.plateau is None:
            message = (
                f"report() needs the 'plateau' schedule (alias 'Adaptive'), but this scheduler "
                f"runs {self.schedule.name!r}, whose LR depends on the step count only"
            )
            raise ScheduleError([Problem("schedule", message)], source="scheduler")
        value = float(metric)
        if math.isnan(value) or self.last_epoch < self.schedule.warmup_steps:
            return False
        reduced = self.plateau.report(value)
        if reduced:
            self._apply_lr()
        return reduced

    def state_dict(self) -> dict[str, Any]:
        """Return a versioned, JSON-safe state with every counter (never a ``__dict__`` dump).

        Example:
            >>> import json, torch
            >>> from gearshift.schedules import build_lr_scheduler
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            >>> sd = build_lr_scheduler(opt, "plateau", total_steps=10).state_dict()
            >>> json.loads(json.dumps(sd, allow_nan=False))["plateau"]["best"]
            'inf'
        """
        return {
            "version": self.STATE_VERSION,
            "name": self.schedule.name,
            "params": self.schedule.params(),
            "last_epoch": int(self.last_epoch),
            "base_lrs": [float(base) for base in self.base_lrs],
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            SCALES_KEY: dict(sorted(self.scales.items())),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` and set the optimizer's LRs to match.

        The schedule name and every parameter must equal this scheduler's own (checkpoint and
        config disagreeing is an error, not a silent choice); use :meth:`from_state_dict` to
        rebuild a scheduler from the state alone. Nothing changes if the state is rejected.

        Raises:
            ScheduleStateError: (a ``ValueError``) naming what is malformed or differs.
        """
        state = _checked_state(state_dict, self.STATE_VERSION)
        if state["name"] != self.schedule.name:
            raise ScheduleStateError(
                f"scheduler state is for schedule {state['name']!r}, but this scheduler runs "
                f"{self.schedule.name!r}; use GearshiftLR.from_state_dict() to rebuild it"
            )
        own, theirs = self.schedule.params(), dict(state["params"])
        diffs = [
            f"{key}: state has {theirs.get(key, '<missing>')!r}, scheduler has "
            f"{own.get(key, '<missing>')!r}"
            for key in sorted(own.keys() | theirs.keys())
            if own.get(key, ...) != theirs.get(key, ...)
        ]
        if diffs:
            raise ScheduleStateError(
                f"scheduler state does not match this {self.schedule.name!r} scheduler "
                f"({'; '.join(diffs)}); build it with the checkpoint's settings or use "
                "GearshiftLR.from_state_dict()"
            )
        base_lrs = [float(lr) for lr in state["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ScheduleStateError(
                f"scheduler state has {len(base_lrs)} base LRs but the optimizer has "
                f"{len(self.optimizer.param_groups)} param groups"
            )
        tracker = None
        if self.plateau is not None:
            if not isinstance(state["plateau"], Mapping):
                raise ScheduleStateError("scheduler state for 'plateau' has no plateau counters")
            tracker = PlateauTracker(self.schedule)  # type: ignore[arg-type]
            tracker.load_state_dict(state["plateau"])
        self.last_epoch = state["last_epoch"]
        self.base_lrs = base_lrs  # type: ignore[assignment]
        self.plateau = tracker
        self.scales = _checked_scales(state.get(SCALES_KEY, {}))
        self._apply_lr()

    def continue_from(self, state_dict: Mapping[str, Any]) -> list[str]:
        """Continue *this* schedule from a saved state of a different one.

        Used when a run is resumed with another schedule (e.g. a raised ``max_steps``): the
        position, base LRs, named scales and, when both are ``plateau``, the plateau counters
        come from the state; the shape stays this scheduler's. Returns notes on what started
        fresh.

        Raises:
            ScheduleStateError: (a ``ValueError``) when the state is malformed.
        """
        state = _checked_state(state_dict, self.STATE_VERSION)
        base_lrs = [float(lr) for lr in state["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ScheduleStateError(
                f"scheduler state has {len(base_lrs)} base LRs but the optimizer has "
                f"{len(self.optimizer.param_groups)} param groups"
            )
        notes = []
        tracker = self.plateau
        if self.plateau is not None and isinstance(state.get("plateau"), Mapping):
            tracker = PlateauTracker(self.schedule)  # type: ignore[arg-type]
            try:
                tracker.load_state_dict(state["plateau"])
            except (ValueError, KeyError):
                tracker = PlateauTracker(self.schedule)  # type: ignore[arg-type]
                notes.append("plateau counters start fresh")
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = base_lrs  # type: ignore[assignment]
        self.plateau = tracker
        self.scales = _checked_scales(state.get(SCALES_KEY, {}))
        self._apply_lr()
        return notes

    @classmethod
    def from_state_dict(cls, optimizer: Optimizer, state_dict: Mapping[str, Any]) -> GearshiftLR:
        """Rebuild a scheduler from a state dict alone (name and parameters included).

        Args:
            optimizer: The optimizer to drive (its param groups must match ``base_lrs``).
            state_dict: A dict from :meth:`state_dict`, possibly through JSON or ``torch.load``.

        Example:
            >>> import torch
            >>> from gearshift.schedules import build_lr_scheduler
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            >>> sd = build_lr_scheduler(opt, "linear", total_steps=4).state_dict()
            >>> GearshiftLR.from_state_dict(opt, sd).schedule.total_steps
            4
        """
        state = _checked_state(state_dict, cls.STATE_VERSION)
        try:
            schedule = build_schedule(state["name"], **dict(state["params"]))
        except (ScheduleError, TypeError) as err:
            raise ScheduleStateError(f"scheduler state holds invalid parameters: {err}") from err
        scheduler = cls(optimizer, schedule)
        scheduler.load_state_dict(dict(state))
        return scheduler


def build_lr_scheduler(
    optimizer: Optimizer,
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    warmup_start_factor: float = 0.0,
    **shape_kwargs: Any,
) -> GearshiftLR:
    """Build a :class:`GearshiftLR` for schedule ``name`` (arguments as in ``build_schedule``).

    After ``k`` calls of ``.step()`` each param group's LR is its base LR times
    ``lr_multiplier(name, k, ...)``. The step unit is whatever the caller steps (optimizer
    updates or epochs); ``total_steps`` and ``warmup_steps`` are in that unit.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> build_lr_scheduler(opt, "WarmupCosine", total_steps=100, warmup_steps=10).get_last_lr()
        [0.0]
    """
    schedule = build_schedule(
        name,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        warmup_start_factor=warmup_start_factor,
        **shape_kwargs,
    )
    return GearshiftLR(optimizer, schedule)
