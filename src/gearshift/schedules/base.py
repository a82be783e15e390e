"""The :class:`Schedule` base class and the field checks every shape shares.

A schedule is a frozen dataclass whose :meth:`Schedule.multiplier` is a pure function of the step
count: nothing is accumulated, so step ``k`` gives the same float whether it is reached by ``k``
calls or computed directly after a resume.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from gearshift.errors import Problem
from gearshift.schedules.errors import ScheduleError

COMMON_FIELDS: tuple[str, ...] = (
    "total_steps",
    "warmup_steps",
    "min_lr_ratio",
    "warmup_start_factor",
)


def as_step(step: object) -> int:
    """Return ``step`` as a non-negative ``int`` or raise :class:`ScheduleError`.

    Args:
        step: The step count to check (any integral value except ``bool``).

    Returns:
        The step as a plain ``int``.

    Example:
        >>> as_step(3)
        3
    """
    value = integral_or_none(step)
    if value is None or value < 0:
        raise ScheduleError([Problem("step", f"must be an integer >= 0, got {step!r}")])
    return value


def integral_or_none(value: object) -> int | None:
    """Return ``value`` as an ``int`` if it is integral (``bool`` excluded), else ``None``."""
    # bool is an int subclass, but `warmup_steps=True` is always a mistake.
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _real(value: object) -> float | None:
    # Strings parse as floats ("1e-3"), which would hide a config typo; bool is never a ratio.
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None
    return result if math.isfinite(result) else None


class FieldChecker:
    """Validates and normalises the fields of one schedule, collecting every problem (internal).

    Normalised values (``numpy.int64`` -> ``int``, ``1`` -> ``1.0``) are written back so that the
    schedule's :meth:`Schedule.params` are plain, JSON-safe Python values.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.problems: list[Problem] = []

    def fail(self, name: str, message: str) -> None:
        """Record a problem with field ``name``."""
        self.problems.append(Problem(name, message))

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self.schedule, name, value)

    def integer(self, name: str, *, minimum: int) -> int | None:
        """Check that field ``name`` is an integer >= ``minimum``; return it or ``None``."""
        raw = getattr(self.schedule, name)
        value = integral_or_none(raw)
        if value is None or value < minimum:
            self.fail(name, f"must be an integer >= {minimum}, got {raw!r}")
            return None
        self._set(name, value)
        return value

    def real(
        self,
        name: str,
        *,
        low: float,
        high: float = math.inf,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float | None:
        """Check that field ``name`` is a finite number in the given interval."""
        raw = getattr(self.schedule, name)
        value = _real(raw)
        too_low = value is not None and (value <= low if low_open else value < low)
        too_high = value is not None and (value >= high if high_open else value > high)
        if value is None or too_low or too_high:
            left = "(" if low_open else "["
            right = ")" if high_open or high == math.inf else "]"
            upper = "inf" if high == math.inf else f"{high:g}"
            self.fail(name, f"must be a number in {left}{low:g}, {upper}{right}, got {raw!r}")
            return None
        self._set(name, value)
        return value

    def choice(self, name: str, choices: Iterable[str]) -> str | None:
        """Check that field ``name`` is one of ``choices``."""
        allowed = tuple(choices)
        raw = getattr(self.schedule, name)
        if raw not in allowed:
            listed = ", ".join(repr(c) for c in allowed)
            self.fail(name, f"must be one of {listed}, got {raw!r}")
            return None
        return str(raw)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Base of every learning-rate shape: a closed-form multiplier of the base LR per step.

    Every shape shares a linear warmup. With ``w = warmup_steps`` and
    ``f = warmup_start_factor``, for ``step < w``::

        multiplier(step) = f + (1 - f) * step / w

    From ``step >= w`` on, the shape's own formula (documented on each subclass) applies. The unit
    of a step is whatever the caller steps: optimizer updates or epochs.

    Args:
        total_steps: Length of the schedule, ``>= 1``.
        warmup_steps: Warmup length, ``0 <= warmup_steps < total_steps``.
        min_lr_ratio: Floor of the decay as a fraction of the base LR, in ``[0, 1]``.
        warmup_start_factor: Multiplier at step 0 of the warmup, in ``[0, 1]``.

    Example:
        >>> from gearshift.schedules import build_schedule
        >>> build_schedule("linear", total_steps=10, warmup_steps=2).multiplier(1)
        0.5
    """

    name: ClassVar[str] = ""

    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    warmup_start_factor: float = 0.0

    def __post_init__(self) -> None:
        if type(self) is Schedule:
            raise TypeError("Schedule is abstract; use build_schedule() or a shape class")
        check = FieldChecker(self)
        total = check.integer("total_steps", minimum=1)
        warmup = check.integer("warmup_steps", minimum=0)
        if total is not None and warmup is not None and warmup >= total:
            check.fail(
                "warmup_steps",
                f"must be < total_steps ({total}), got {warmup}; shorten the warmup or "
                "lengthen the run",
            )
        check.real("min_lr_ratio", low=0.0, high=1.0)
        check.real("warmup_start_factor", low=0.0, high=1.0)
        # Shape checks that relate a shape field to total_steps need valid common fields.
        self._check_shape(check, common_ok=not check.problems)
        if check.problems:
            raise ScheduleError(check.problems, source=f"schedule {self.name!r}")

    def _check_shape(self, check: FieldChecker, *, common_ok: bool) -> None:
        """Validate and normalise the shape's own fields (subclasses override)."""

    def _decay(self, step: int) -> float:
        """The shape's multiplier for ``step >= warmup_steps`` (subclasses override)."""
        raise NotImplementedError

    def multiplier(self, step: int) -> float:
        """Return the LR multiplier at ``step`` (0-based; any step past the end is allowed).

        Args:
            step: Number of scheduler steps taken so far, ``>= 0``.

        Returns:
            The factor to multiply each base LR by.

        Example:
            >>> from gearshift.schedules import build_schedule
            >>> build_schedule("constant", total_steps=4, warmup_steps=2).multiplier(1)
            0.5
        """
        step = as_step(step)
        if step < self.warmup_steps:
            f = self.warmup_start_factor
            return f + (1.0 - f) * (float(step) / float(self.warmup_steps))
        return self._decay(step)

    def progress(self, step: int) -> float:
        """Return ``clamp((step - w) / (T - w), 0, 1)``, the post-warmup progress.

        Example:
            >>> from gearshift.schedules import build_schedule
            >>> build_schedule("linear", total_steps=12, warmup_steps=2).progress(7)
            0.5
        """
        done = float(step - self.warmup_steps) / float(self.total_steps - self.warmup_steps)
        return min(1.0, max(0.0, done))

    def params(self) -> dict[str, Any]:
        """Return every field as a JSON-safe dict (tuples become lists).

        Example:
            >>> from gearshift.schedules import build_schedule
            >>> build_schedule("polynomial", total_steps=5, power=2).params()["power"]
            2.0
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def options(cls) -> dict[str, object]:
        """Return the shape-specific fields and their defaults (the common four excluded).

        Example:
            >>> from gearshift.schedules import SCHEDULES
            >>> SCHEDULES["polynomial"].options()
            {'power': 1.0}
        """
        return {f.name: f.default for f in fields(cls) if f.name not in COMMON_FIELDS}
