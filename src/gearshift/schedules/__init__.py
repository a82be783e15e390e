"""Exact, closed-form learning-rate schedules.

Every schedule is a small frozen dataclass whose ``multiplier(step)`` is a pure function of the
step count, plus a shared linear warmup. :class:`GearshiftLR` applies one to a torch optimizer
and computes the LR from its step count each time (never by multiplying the previous LR), so a
resumed run reproduces the uninterrupted LR sequence bit for bit.

The step unit is whatever the caller steps: the trainer decides whether ``.step()`` runs once
per optimizer update or once per epoch, and ``total_steps``/``warmup_steps`` are counted in that
unit.

Schedules (aliases in brackets, names are case-insensitive): ``constant`` [Default], ``linear``,
``cosine``, ``warmup_cosine`` [WarmupCosine], ``cosine_with_restarts``, ``polynomial``,
``exponential`` [Exponential], ``multistep`` [MultiStage], ``inverse_sqrt``,
``warmup_stable_decay``, ``plateau`` [Adaptive].

Example:
    >>> import torch
    >>> from gearshift.schedules import build_lr_scheduler, lr_multiplier
    >>> opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    >>> sched = build_lr_scheduler(opt, "warmup_cosine", total_steps=110, warmup_steps=10)
    >>> lr_multiplier("warmup_cosine", 5, total_steps=110, warmup_steps=10)
    0.5
"""

from gearshift.schedules.base import Schedule
from gearshift.schedules.errors import ScheduleError, ScheduleStateError
from gearshift.schedules.registry import (
    ALIASES,
    SCHEDULES,
    build_schedule,
    lr_multiplier,
    resolve_schedule_name,
    schedule_options,
)
from gearshift.schedules.scheduler import GearshiftLR, build_lr_scheduler

__all__ = [
    "ALIASES",
    "SCHEDULES",
    "GearshiftLR",
    "Schedule",
    "ScheduleError",
    "ScheduleStateError",
    "build_lr_scheduler",
    "build_schedule",
    "lr_multiplier",
    "resolve_schedule_name",
    "schedule_options",
]
