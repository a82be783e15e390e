"""Reduce-on-plateau: a closed-form warmup plus a metric-driven factor.

The :class:`Plateau` shape is only the clock part (warmup, then 1). The metric part lives in a
:class:`PlateauTracker`, owned by :class:`~gearshift.schedules.scheduler.GearshiftLR` and fed
through ``GearshiftLR.report(metric)``; its counters are all in the scheduler's state dict, so a
resumed run reduces at the same report as the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gearshift.schedules.base import FieldChecker, Schedule
from gearshift.schedules.errors import ScheduleStateError

MODES: tuple[str, ...] = ("min", "max")
THRESHOLD_MODES: tuple[str, ...] = ("rel", "abs")


@dataclass(frozen=True, kw_only=True)
class Plateau(Schedule):
    """Warmup, then a factor that drops by ``factor`` whenever the reported metric stalls.

    The closed-form part is ``multiplier = 1`` for ``s >= w``. The scheduler multiplies it by a
    current factor that starts at 1 and becomes ``max(m, current * factor)`` after more than
    ``patience`` consecutive reports that do not improve on the best one (torch
    ``ReduceLROnPlateau`` semantics). ``cooldown`` reports after each reduction are not counted
    as bad. Reports made during the warmup are ignored.

    Args:
        mode: ``"min"`` when lower metrics are better (a loss), ``"max"`` otherwise.
        factor: Multiplier applied at each reduction, in ``(0, 1)``.
        patience: Bad reports tolerated before reducing, ``>= 0``.
        threshold: Minimum change that counts as an improvement, ``>= 0``.
        threshold_mode: ``"rel"`` (relative to the best) or ``"abs"``.
        cooldown: Reports after a reduction during which bad reports are not counted.

    Example:
        >>> Plateau(total_steps=100, warmup_steps=10).multiplier(50)
        1.0
    """

    name: ClassVar[str] = "plateau"

    mode: str = "min"
    factor: float = 0.5
    patience: int = 2
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0

    def _check_shape(self, check: FieldChecker, *, common_ok: bool) -> None:
        check.choice("mode", MODES)
        check.real("factor", low=0.0, high=1.0, low_open=True, high_open=True)
        check.integer("patience", minimum=0)
        check.real("threshold", low=0.0)
        check.choice("threshold_mode", THRESHOLD_MODES)
        check.integer("cooldown", minimum=0)

    def _decay(self, step: int) -> float:
        return 1.0


def _encode(value: float) -> float | str:
    # json.dumps(allow_nan=False) rejects inf, and the initial best is +-inf.
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _decode(value: object, key: str) -> float:
    if value in ("inf", "-inf"):
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ScheduleStateError(f"plateau state {key!r} must be a number, 'inf' or '-inf'")
    return float(value)


@dataclass
class PlateauTracker:
    """The mutable, metric-driven half of the plateau schedule.

    Args:
        schedule: The plateau settings (mode, factor, patience, ...).

    Example:
        >>> tracker = PlateauTracker(Plateau(total_steps=10, patience=0))
        >>> tracker.report(1.0), tracker.report(1.0), tracker.current_factor
        (False, True, 0.5)
    """

    schedule: Plateau
    best: float = field(init=False)
    num_bad: int = 0
    cooldown_counter: int = 0
    current_factor: float = 1.0
    num_reductions: int = 0

    STATE_KEYS: ClassVar[tuple[str, ...]] = (
        "best",
        "num_bad",
        "cooldown_counter",
        "current_factor",
        "num_reductions",
    )

    def __post_init__(self) -> None:
        self.best = math.inf if self.schedule.mode == "min" else -math.inf

    def is_better(self, metric: float) -> bool:
        """Whether ``metric`` improves on the best by more than the threshold."""
        s = self.schedule
        if s.threshold_mode == "rel":
            scale = 1.0 - s.threshold if s.mode == "min" else 1.0 + s.threshold
            target = self.best * scale
        else:
            target = self.best - s.threshold if s.mode == "min" else self.best + s.threshold
        return metric < target if s.mode == "min" else metric > target

    def report(self, metric: float) -> bool:
        """Record one metric value; return ``True`` when it lowered the current factor.

        A NaN metric is ignored and changes nothing.
        """
        if math.isnan(metric):
            return False
        if self.is_better(metric):
            self.best = metric
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad <= self.schedule.patience:
            return False
        old = self.current_factor
        self.current_factor = max(self.schedule.min_lr_ratio, old * self.schedule.factor)
        # Counters reset even at the floor, as in torch, so a floored run does not re-trigger
        # on every following report.
        self.cooldown_counter = self.schedule.cooldown
        self.num_bad = 0
        reduced = self.current_factor < old
        self.num_reductions += int(reduced)
        return reduced

    def state_dict(self) -> dict[str, Any]:
        """Return every counter as a JSON-safe dict (``best`` may be ``"inf"``/``"-inf"``)."""
        return {
            "best": _encode(self.best),
            "num_bad": self.num_bad,
            "cooldown_counter": self.cooldown_counter,
            "current_factor": self.current_factor,
            "num_reductions": self.num_reductions,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters written by :meth:`state_dict`."""
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise ScheduleStateError(f"plateau state is missing {', '.join(missing)}")
        counts = {}
        for key in ("num_bad", "cooldown_counter", "num_reductions"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ScheduleStateError(f"plateau state {key!r} must be an integer >= 0")
            counts[key] = value
        current = _decode(state["current_factor"], "current_factor")
        if not 0.0 <= current <= 1.0:
            raise ScheduleStateError(
                f"plateau state 'current_factor' must be in [0, 1], got {current}"
            )
        self.best = _decode(state["best"], "best")
        self.current_factor = current
        self.num_bad = counts["num_bad"]
        self.cooldown_counter = counts["cooldown_counter"]
        self.num_reductions = counts["num_reductions"]
