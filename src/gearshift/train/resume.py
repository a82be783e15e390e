"""What wins when a checkpoint and the config disagree, applied to the LR schedule.

The policy (also in the README):

- from the checkpoint: model weights, optimizer state (peak LR included), step, epoch and data
  position, RNG states, the schedule's position and plateau counters, callback states, seed;
- from the config: the run's length (``max_steps`` / ``epochs``), the schedule's shape,
  evaluation / logging / checkpoint cadences, and logging destinations.

When the config's schedule differs from the checkpoint's (e.g. ``max_steps`` was raised), the
run continues on the *config's* closed form from the checkpoint's step, and says so.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from gearshift.schedules import GearshiftLR, ScheduleStateError


def restore_schedule(scheduler: GearshiftLR, state: dict[str, Any],
                     optimizer: Optimizer) -> list[str]:
    """Load the schedule state, or move the config's schedule to the saved position."""
    try:
        scheduler.load_state_dict(state)
        return []
    except ScheduleStateError as exc:
        note = (f"schedule differs from the checkpoint's ({exc}); continuing the config's "
                f"schedule from step {state.get('last_epoch')}")
    scheduler.last_epoch = int(state["last_epoch"])
    scheduler.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    if scheduler.plateau is not None and isinstance(state.get("plateau"), dict):
        try:
            scheduler.plateau.load_state_dict(state["plateau"])
        except (ValueError, KeyError):
            note += "; plateau counters start fresh"
    scheduler._apply_lr()
    return [note]
