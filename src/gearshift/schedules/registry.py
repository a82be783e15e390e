"""Name registry and factories: resolve a (possibly aliased) name, list options, build shapes."""

from __future__ import annotations

import difflib
from typing import Any

from gearshift.errors import Problem
from gearshift.schedules.base import Schedule
from gearshift.schedules.cosine import Cosine, CosineWithRestarts, WarmupCosine
from gearshift.schedules.errors import ScheduleError
from gearshift.schedules.plateau import Plateau
from gearshift.schedules.shapes import (
    Constant,
    Exponential,
    InverseSqrt,
    Linear,
    MultiStep,
    Polynomial,
    WarmupStableDecay,
)

SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (
        Constant,
        Linear,
        Cosine,
        WarmupCosine,
        CosineWithRestarts,
        Polynomial,
        Exponential,
        MultiStep,
        InverseSqrt,
        WarmupStableDecay,
        Plateau,
    )
}
"""Canonical schedule name -> shape class."""

ALIASES: dict[str, str] = {
    "Default": "constant",
    "Exponential": "exponential",
    "MultiStage": "multistep",
    "Adaptive": "plateau",
    "WarmupCosine": "warmup_cosine",
}
"""Alternative spellings (matched case-insensitively) -> canonical name."""

_LOOKUP: dict[str, str] = {
    **{name.casefold(): name for name in SCHEDULES},
    **{alias.casefold(): target for alias, target in ALIASES.items()},
}


def _valid_names() -> str:
    aliases = ", ".join(f"{alias} ({target})" for alias, target in ALIASES.items())
    return f"valid names: {', '.join(SCHEDULES)}; aliases: {aliases}"


def resolve_schedule_name(name: str) -> str:
    """Return the canonical name for ``name`` (a canonical name or alias, any case).

    Args:
        name: A schedule name such as ``"warmup_cosine"``, ``"WarmupCosine"`` or ``"adaptive"``.

    Returns:
        The key of :data:`SCHEDULES` it refers to.

    Raises:
        ScheduleError: (a ``ValueError``) if the name is unknown; the message lists every valid
            name and alias, with a suggestion when one is close.

    Example:
        >>> resolve_schedule_name("MULTISTAGE")
        'multistep'
    """
    if isinstance(name, str):
        found = _LOOKUP.get(name.strip().casefold())
        if found is not None:
            return found
        close = difflib.get_close_matches(name.strip().casefold(), list(_LOOKUP), n=1)
        hint = f"did you mean {_LOOKUP[close[0]]!r}? " if close else ""
        message = f"unknown schedule {name!r}; {hint}{_valid_names()}"
    else:
        message = f"must be a string, got {type(name).__name__}; {_valid_names()}"
    raise ScheduleError([Problem("name", message)], source="schedule name")


def schedule_options(name: str) -> dict[str, object]:
    """Return the shape-specific keyword arguments of schedule ``name`` and their defaults.

    The common arguments (``total_steps``, ``warmup_steps``, ``min_lr_ratio``,
    ``warmup_start_factor``) are not included.

    Args:
        name: A schedule name or alias.

    Example:
        >>> schedule_options("warmup_stable_decay")
        {'decay_ratio': 0.1, 'decay_type': 'linear'}
    """
    return SCHEDULES[resolve_schedule_name(name)].options()


def build_schedule(
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    warmup_start_factor: float = 0.0,
    **shape_kwargs: Any,
) -> Schedule:
    """Validate every argument and return the frozen schedule.

    Args:
        name: A schedule name or alias (see :data:`SCHEDULES` and :data:`ALIASES`).
        total_steps: Length of the schedule in caller steps, ``>= 1``.
        warmup_steps: Linear warmup length, ``0 <= warmup_steps < total_steps``.
        min_lr_ratio: Floor of the decay as a fraction of the base LR, in ``[0, 1]``.
        warmup_start_factor: Multiplier at the first warmup step, in ``[0, 1]``.
        **shape_kwargs: Shape options; see :func:`schedule_options`.

    Returns:
        The schedule, whose ``multiplier(step)`` gives the LR factor.

    Raises:
        ScheduleError: (a ``ValueError``) listing every invalid argument, by name, with the
            allowed values.

    Example:
        >>> build_schedule("linear", total_steps=4).multiplier(1)
        0.75
    """
    canonical = resolve_schedule_name(name)
    cls = SCHEDULES[canonical]
    options = cls.options()
    problems: list[Problem] = []
    for key in shape_kwargs:
        if key not in options:
            valid = ", ".join(options) if options else "none"
            problems.append(
                Problem(key, f"unknown option for schedule {canonical!r}; valid options: {valid}")
            )
    known = {k: v for k, v in shape_kwargs.items() if k in options}
    try:
        schedule = cls(
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            warmup_start_factor=warmup_start_factor,
            **known,
        )
    except ScheduleError as err:
        problems.extend(err.problems)
    if problems:
        raise ScheduleError(problems, source=f"schedule {canonical!r}")
    return schedule


def lr_multiplier(
    name: str,
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    warmup_start_factor: float = 0.0,
    **shape_kwargs: Any,
) -> float:
    """Return the LR multiplier of schedule ``name`` at ``step`` (see :func:`build_schedule`).

    For ``plateau`` this is the clock part only (warmup, then 1).

    Example:
        >>> lr_multiplier("warmup_cosine", 60, total_steps=110, warmup_steps=10)
        0.5
    """
    return build_schedule(
        name,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        warmup_start_factor=warmup_start_factor,
        **shape_kwargs,
    ).multiplier(step)
