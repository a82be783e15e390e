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

from pathlib import Path
from typing import Any

from torch.optim import Optimizer

from gearshift.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from gearshift.errors import CheckpointError
from gearshift.rundir import RunPaths
from gearshift.schedules import GearshiftLR, ScheduleStateError
from gearshift.train.dynamics import SIGNS

STATE_VERSION = 1


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


class ResumeMixin:
    """The trainer's resumable state: what a checkpoint holds besides weights and optimizer."""

    def _maybe_resume(self) -> tuple[Path, list[str], list[str]] | None:
        ckpt_dir = RunPaths(self.resume_from).checkpoints
        manager = CheckpointManager(ckpt_dir, keep_last=self.config.checkpoint.keep_last)
        found, skipped = self._load_newest(manager)
        for line in skipped:
            self._print(f"skipping corrupt checkpoint {line}")
        if found is None:
            raise CheckpointError(
                f"no valid checkpoint in {ckpt_dir}" + (f" ({len(skipped)} corrupt)" if skipped
                                                         else "") +
                "; start a new run instead of resuming")
        path, notes = found
        skipped_text = skipped
        self._print(f"resumed from {path} at step {self.step}")
        for note in notes:
            self._print(f"  {note}")
        return path, skipped_text, notes

    def _load_newest(self, manager: CheckpointManager,
                     ) -> tuple[tuple[Path, list[str]] | None, list[str]]:
        """Load the newest checkpoint that verifies *and* fits; report every one skipped.

        A checkpoint can pass its manifest yet not fit (a tensor of the wrong shape written by
        other code); loading checks everything before it changes anything, so the next older
        one can simply be tried.
        """
        skipped: list[str] = []
        for path in reversed(manager.list_checkpoints()):
            try:
                loaded = manager.load(path, model=self.raw_model, optimizer=self.optimizer,
                                      strict=not self.config.lora.enabled)
                notes = self._load_state(loaded.trainer_state)
                notes.extend(self.dynamics.load(loaded.trainer_state,
                                                loaded.tensors.get(SIGNS)))
            except CheckpointError as exc:
                skipped.append(f"{path.name}: {exc}")
                continue
            self._apply_lr_scale()
            return (path, notes), skipped
        return None, skipped

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything besides weights and optimizer needed to continue exactly (JSON-safe)."""
        scaler = self.accelerator.scaler
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "seed": self.config.seed,
            "position": self.stream.position.state_dict(),
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "schedule": self.scheduler.state_dict(),
            "schedule_interval": self.config.schedule.interval,
            "rng": capture_rng_state(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "callbacks": self.callbacks.state_dict(),
            "initial_eval": self.initial_eval,
            "micro_limit": self.micro_limit,
            "lr_factor": self.lr_factor,
            "rollbacks": self.rollbacks,
            **self.dynamics.json_state(),
        }

    def _load_state(self, state: dict[str, Any]) -> list[str]:
        """Restore from a checkpoint's trainer state; returns notes on what won where."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"trainer state version {state.get('version')} is not "
                                  f"supported (expected {STATE_VERSION})")
        notes = ["from the checkpoint: weights, optimizer, step, data position, RNG, schedule "
                 "position; from the config: run length, cadences, logging"]
        self.step = int(state["step"])
        self.stream.position.load_state_dict(state["position"])
        if state["seed"] != self.config.seed:
            notes.append(f"seed {state['seed']} from the checkpoint wins over {self.config.seed} "
                         "in the config (data order must not change mid-run)")
            self.stream.seed = int(state["seed"])
        if state.get("total_steps") != self.total_steps:
            notes.append(f"run length {self.total_steps} steps from the config "
                         f"(the checkpoint's run planned {state.get('total_steps')})")
        notes.extend(restore_schedule(self.scheduler, state["schedule"], self.optimizer))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.initial_eval = state.get("initial_eval")
        self.micro_limit = state.get("micro_limit")
        self.lr_factor = float(state.get("lr_factor", 1.0))
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        missing = self.callbacks.load_state_dict(state.get("callbacks", {}))
        if missing:
            notes.append(f"no saved state for callbacks {missing}: they start fresh")
        restore_rng_state(state["rng"])
        return notes

