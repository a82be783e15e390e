"""Errors raised by :mod:`gearshift.schedules`.

Both classes are also :class:`ValueError` so that code which only knows the standard library can
catch them, while the CLI still sees a :class:`~gearshift.errors.GearshiftError` and prints one
clear block of text instead of a traceback.
"""

from __future__ import annotations

from gearshift.errors import CheckpointError, ConfigError


class ScheduleError(ConfigError, ValueError):
    """A schedule name, argument or shape option is invalid.

    Holds every problem found (``.problems``, each with the argument name as its ``path``), so a
    config layer can re-prefix the paths (``schedule.options.power``) before showing them.

    Example:
        >>> from gearshift.schedules import build_schedule
        >>> try:
        ...     build_schedule("linear", total_steps=0)
        ... except ValueError as err:
        ...     print(err.problems[0].path)
        total_steps
    """


class ScheduleStateError(CheckpointError, ValueError):
    """A scheduler state dict is malformed or does not match the scheduler it is loaded into.

    Example:
        >>> import torch
        >>> from gearshift.schedules import build_lr_scheduler
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> sched = build_lr_scheduler(opt, "linear", total_steps=10)
        >>> try:
        ...     sched.load_state_dict({"version": 99})
        ... except ValueError as err:
        ...     print(type(err).__name__)
        ScheduleStateError
    """
