"""Non-cosine shapes: constant, linear, polynomial, exponential, multistep, inverse-sqrt, WSD.

Notation in every formula: ``s`` step, ``T = total_steps``, ``w = warmup_steps``,
``m = min_lr_ratio``, ``p = clamp((s - w) / (T - w), 0, 1)``. The warmup (``s < w``) is the same
for every shape and is documented on :class:`~gearshift.schedules.base.Schedule`.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from gearshift.schedules.base import FieldChecker, Schedule, integral_or_none
from gearshift.schedules.cosine import half_cosine


@dataclass(frozen=True, kw_only=True)
class Constant(Schedule):
    """Constant LR after the warmup: ``multiplier = 1`` for ``s >= w`` (``m`` is unused).

    Example:
        >>> Constant(total_steps=10, warmup_steps=4).multiplier(2)
        0.5
    """

    name: ClassVar[str] = "constant"

    def _decay(self, step: int) -> float:
        return 1.0


@dataclass(frozen=True, kw_only=True)
class Linear(Schedule):
    """Linear decay from 1 at ``s = w`` to ``m`` at ``s = T``: ``m + (1 - m) * (1 - p)``.

    Example:
        >>> Linear(total_steps=10, min_lr_ratio=0.5).multiplier(5)
        0.75
    """

    name: ClassVar[str] = "linear"

    def _decay(self, step: int) -> float:
        m = self.min_lr_ratio
        return m + (1.0 - m) * (1.0 - self.progress(step))


@dataclass(frozen=True, kw_only=True)
class Polynomial(Schedule):
    """Polynomial decay: ``m + (1 - m) * (1 - p) ** power`` for ``s >= w``.

    Args:
        power: Exponent of the decay, ``> 0`` (1 is linear, 2 is quadratic).

    Example:
        >>> Polynomial(total_steps=10, power=2.0).multiplier(5)
        0.25
    """

    name: ClassVar[str] = "polynomial"

    power: float = 1.0

    def _check_shape(self, check: FieldChecker, *, common_ok: bool) -> None:
        check.real("power", low=0.0, low_open=True)

    def _decay(self, step: int) -> float:
        m = self.min_lr_ratio
        return m + (1.0 - m) * (1.0 - self.progress(step)) ** self.power


@dataclass(frozen=True, kw_only=True)
class Exponential(Schedule):
    """Exponential decay after the warmup: ``max(m, gamma ** (s - w))`` for ``s >= w``.

    It does not reach ``m`` at ``T`` by construction; ``T`` only bounds the warmup.

    Args:
        gamma: Decay per step, in ``(0, 1]``.

    Example:
        >>> Exponential(total_steps=10, gamma=0.5).multiplier(3)
        0.125
    """

    name: ClassVar[str] = "exponential"

    gamma: float = 0.999

    def _check_shape(self, check: FieldChecker, *, common_ok: bool) -> None:
        check.real("gamma", low=0.0, high=1.0, low_open=True)

    def _decay(self, step: int) -> float:
        return max(self.min_lr_ratio, self.gamma ** (step - self.warmup_steps))


@dataclass(frozen=True, kw_only=True)
class MultiStep(Schedule):
    """Step decay at fixed milestones: ``max(m, gamma ** #{milestones <= s})`` for ``s >= w``.

    Milestones are on the global clock (step 0 is the first step, warmup included).

    Args:
        milestones: Strictly increasing steps in ``[0, total_steps]``; ``None`` means
            ``[T // 2, 3 * T // 4]`` (duplicates dropped for tiny ``T``).
        gamma: Factor applied at each milestone, in ``(0, 1]``.

    Example:
        >>> s = MultiStep(total_steps=100)
        >>> s.milestones, s.multiplier(49), s.multiplier(50), s.multiplier(75)
        ((50, 75), 1.0, 0.1, 0.010000000000000002)
    """

    name: ClassVar[str] = "multistep"

    milestones: Sequence[int] | None = None
    gamma: float = 0.1

    def _check_shape(self, check: FieldChecker, *, common_ok: bool) -> None:
        check.real("gamma", low=0.0, high=1.0, low_open=True)
        raw = self.milestones
        if raw is None:
            if common_ok:
                t = self.total_steps
                object.__setattr__(self, "milestones", tuple(sorted({t // 2, 3 * t // 4})))
            return
        values = None
        if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
            values = [integral_or_none(v) for v in raw]
        if values is None or any(v is None or v < 0 for v in values):
            check.fail("milestones", f"must be a list of integers >= 0, got {raw!r}")
            return
        ints = [v for v in values if v is not None]
        if any(b <= a for a, b in zip(ints, ints[1:], strict=False)):
            check.fail("milestones", f"must be strictly increasing, got {ints}")
            return
        if common_ok and ints and ints[-1] > self.total_steps:
            check.fail(
                "milestones",
                f"must be <= total_steps ({self.total_steps}); {ints[-1]} would never be reached",
            )
            return
        object.__setattr__(self, "milestones", tuple(ints))

    def _decay(self, step: int) -> float:
        passed = bisect_right(self.milestones or (), step)
        return max(self.min_lr_ratio, self.gamma**passed)


@dataclass(frozen=True, kw_only=True)
class InverseSqrt(Schedule):
    """Inverse square-root decay: ``max(m, 1 / sqrt((s - w + tau) / tau))`` for ``s >= w``.

    With ``m = 0`` and ``warmup_start_factor = 0`` it equals transformers'
    ``get_inverse_sqrt_schedule(num_warmup_steps=w, timescale=tau)``. Note the default
    differs when ``w = 0``: transformers then uses ``tau = 10000``, this schedule ``tau = 1``.

    Args:
        timescale: ``tau``, an integer ``>= 1``; ``None`` means ``max(w, 1)``.

    Example:
        >>> InverseSqrt(total_steps=100, warmup_steps=4).multiplier(16)
        0.5
    """

    name: ClassVar[str] = "inverse_sqrt"

    timescale: int | None = None

    def _check_shape(self, check: FieldChecker, *, common_ok: bool) -> None:
        if self.timescale is not None:
            check.integer("timescale", minimum=1)
        elif common_ok:
            object.__setattr__(self, "timescale", max(self.warmup_steps, 1))

    def _decay(self, step: int) -> float:
        tau = self.timescale or 1
        decay = 1.0 / math.sqrt((step - self.warmup_steps + tau) / tau)
        return max(self.min_lr_ratio, decay)


DECAY_TYPES: tuple[str, ...] = ("linear", "cosine", "sqrt")


@dataclass(frozen=True, kw_only=True)
class WarmupStableDecay(Schedule):
    """Warmup, a stable phase at 1, then a decay over the last ``d`` steps (WSD).

    With ``d = max(1, round(decay_ratio * T))`` (Python's ``round``, half to even) and
    ``q = clamp((s - (T - d)) / d, 0, 1)``::

        multiplier = 1                          for w <= s < T - d
                   = m + (1 - m) * shape(q)     for s >= T - d

    where ``shape`` is ``1 - q`` (linear), ``0.5 * (1 + cos(pi * q))`` (cosine) or
    ``1 - sqrt(q)`` (sqrt). The decay must not start inside the warmup (``T - d >= w``).

    Args:
        decay_ratio: Fraction of ``total_steps`` spent decaying, in ``(0, 1]``.
        decay_type: ``"linear"``, ``"cosine"`` or ``"sqrt"``.

    Example:
        >>> s = WarmupStableDecay(total_steps=100, decay_ratio=0.2)
        >>> [s.multiplier(k) for k in (10, 80, 90, 100)]
        [1.0, 1.0, 0.5, 0.0]
    """

    name: ClassVar[str] = "warmup_stable_decay"

    decay_ratio: float = 0.1
    decay_type: str = "linear"

    def _check_shape(self, check: FieldChecker, *, common_ok: bool) -> None:
        ratio = check.real("decay_ratio", low=0.0, high=1.0, low_open=True)
        check.choice("decay_type", DECAY_TYPES)
        if ratio is None or not common_ok:
            return
        start = self.total_steps - self.decay_steps
        if start < self.warmup_steps:
            check.fail(
                "decay_ratio",
                f"the decay would start at step {start} (total_steps {self.total_steps} minus "
                f"{self.decay_steps} decay steps), inside the warmup of {self.warmup_steps} "
                "steps; lower decay_ratio or warmup_steps",
            )

    @property
    def decay_steps(self) -> int:
        """``d = max(1, round(decay_ratio * total_steps))``, the length of the decay phase."""
        return max(1, round(self.decay_ratio * self.total_steps))

    def _decay(self, step: int) -> float:
        d = self.decay_steps
        start = self.total_steps - d
        if step < start:
            return 1.0
        q = min(1.0, max(0.0, float(step - start) / float(d)))
        if self.decay_type == "cosine":
            shaped = half_cosine(q)
        elif self.decay_type == "sqrt":
            shaped = 1.0 - math.sqrt(q)
        else:
            shaped = 1.0 - q
        m = self.min_lr_ratio
        return m + (1.0 - m) * shaped
