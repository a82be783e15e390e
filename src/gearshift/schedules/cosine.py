"""Cosine shapes: on the global clock, after the warmup, and with hard restarts.

Notation in every formula: ``s`` step, ``T = total_steps``, ``w = warmup_steps``,
``m = min_lr_ratio``, ``p = clamp((s - w) / (T - w), 0, 1)``. The warmup (``s < w``) is the same
for every shape and is documented on :class:`~gearshift.schedules.base.Schedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from gearshift.schedules.base import FieldChecker, Schedule


def half_cosine(fraction: float) -> float:
    """Return ``0.5 * (1 + cos(pi * fraction))``: 1 at 0, 0 at 1.

    Example:
        >>> half_cosine(0.5)
        0.5
    """
    return 0.5 * (1.0 + math.cos(math.pi * fraction))


@dataclass(frozen=True, kw_only=True)
class WarmupCosine(Schedule):
    """Cosine decay that starts after the warmup (the usual fine-tuning schedule).

    For ``s >= w``::

        multiplier = m + (1 - m) * 0.5 * (1 + cos(pi * p))

    so it is 1 at ``s = w``, ``m`` at ``s = T`` and stays ``m`` after ``T``. With
    ``warmup_start_factor = 0`` it equals transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=m)`` for every ``s <= T`` (past ``T``
    transformers keeps following the cosine back up; this schedule holds ``m``).

    Example:
        >>> s = WarmupCosine(total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
        >>> [round(s.multiplier(k), 6) for k in (0, 5, 10, 60, 110, 200)]
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """

    name: ClassVar[str] = "warmup_cosine"

    def _decay(self, step: int) -> float:
        m = self.min_lr_ratio
        return m + (1.0 - m) * half_cosine(self.progress(step))


@dataclass(frozen=True, kw_only=True)
class Cosine(Schedule):
    """Cosine decay on the global clock; the warmup overlays its start (as in common vision recipes).

    For ``s >= w``::

        multiplier = m + (1 - m) * 0.5 * (1 + cos(pi * min(s, T) / T))

    Unlike :class:`WarmupCosine`, the cosine is measured from step 0, not from the end of the
    warmup: the warmup replaces the first ``w`` steps of the curve, so the first post-warmup value
    is already slightly below 1 (a small drop at ``s = w``) and the decay is not stretched to fit
    the shorter post-warmup span.

    Example:
        >>> Cosine(total_steps=100, warmup_steps=0).multiplier(50)
        0.5
    """

    name: ClassVar[str] = "cosine"

    def _decay(self, step: int) -> float:
        m = self.min_lr_ratio
        fraction = float(min(step, self.total_steps)) / float(self.total_steps)
        return m + (1.0 - m) * half_cosine(fraction)


@dataclass(frozen=True, kw_only=True)
class CosineWithRestarts(Schedule):
    """``num_cycles`` cosine decays after the warmup, each restarting from 1.

    For ``s >= w``::

        multiplier = m                                              if p >= 1
                   = m + (1 - m) * 0.5 * (1 + cos(pi * ((n * p) mod 1)))  otherwise

    with ``n = num_cycles``. With ``m = 0`` and ``warmup_start_factor = 0`` it equals
    transformers' ``get_cosine_with_hard_restarts_schedule_with_warmup(num_cycles=n)``.

    Args:
        num_cycles: Number of cosine cycles between the warmup and ``total_steps``, ``>= 1``.

    Example:
        >>> s = CosineWithRestarts(total_steps=100, num_cycles=2)
        >>> [s.multiplier(k) for k in (0, 25, 50, 100)]
        [1.0, 0.5, 1.0, 0.0]
    """

    name: ClassVar[str] = "cosine_with_restarts"

    num_cycles: int = 2

    def _check_shape(self, check: FieldChecker, *, common_ok: bool) -> None:
        check.integer("num_cycles", minimum=1)

    def _decay(self, step: int) -> float:
        p = self.progress(step)
        m = self.min_lr_ratio
        if p >= 1.0:
            return m
        return m + (1.0 - m) * half_cosine((float(self.num_cycles) * p) % 1.0)
