"""`TrainState`: everything besides weights and optimizer that a run needs to continue exactly.

One object, one :meth:`TrainState.state_dict` / :meth:`TrainState.load_state_dict`: the
counters (step, samples / tokens seen, micro-batch limit after an OOM, rollbacks), the data
position and seed, the RNGs, the loss scaler, and the state of every stateful part of the run —
the LR schedule (with its plateau factor, phase scale and rollback factor), the phase controller
and gradient-sign tracker, the task, and the callbacks.

What wins when a checkpoint and the config disagree (also in the README):

- from the checkpoint: model weights, optimizer state (peak LR included), step, epoch and data
  position, RNG states, the schedule's position, plateau counters and factors, callback states,
  task state, seed;
- from the config: the run's length (``max_steps`` / ``epochs``), the schedule's shape,
  evaluation / logging / checkpoint cadences, and logging destinations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gearshift.checkpoint import capture_rng_state, restore_rng_state
from gearshift.errors import CheckpointError
from gearshift.schedules import GearshiftLR, ScheduleStateError
from gearshift.train import setup

if TYPE_CHECKING:
    from gearshift.train.callbacks import CallbackList
    from gearshift.train.dynamics import PhaseDriver
    from gearshift.train.stream import BatchStream
    from gearshift.train.task import Task
    from gearshift.transforms import TransformChain

STATE_VERSION = 1
TASK_TENSORS = "task"


def restore_schedule(scheduler: GearshiftLR, state: dict[str, Any]) -> list[str]:
    """Load the schedule state, or move the config's schedule to the saved position."""
    try:
        scheduler.load_state_dict(state)
        return []
    except ScheduleStateError as exc:
        note = (f"schedule differs from the checkpoint's ({exc}); continuing the config's "
                f"schedule from step {state.get('last_epoch')}")
    try:
        fresh = scheduler.continue_from(state)
    except ScheduleStateError as exc:
        raise CheckpointError(f"the checkpoint's schedule state cannot be used: {exc}") from None
    return ["; ".join([note, *fresh])]


@dataclass
class TrainState:
    """The run's resumable state, shared by the loop, recovery, evaluation and checkpoints.

    Attributes:
        stream: The training batches; its position (epoch, micro-batch) and seed are saved.
        scheduler: The LR schedule, the LR's only writer.
        phases: The phase controller and gradient-sign tracker (inactive without phases).
        task: The task whose own state is saved.
        callbacks: The callbacks whose states are saved.
        scaler: The fp16 loss scaler, when there is one.
        seed: The run's seed (from the checkpoint when resumed).
        total_steps: Optimizer steps of the run (always from the config).
        schedule_interval: ``step`` or ``epoch`` (saved to explain the schedule position).
        step: Optimizer updates done.
        samples_seen: Samples fed to the model, over all processes.
        tokens_seen: Tokens fed to the model, over all processes.
        micro_limit: Samples per forward pass after an out-of-memory error (None: whole batches).
        rollbacks: Rollbacks to a checkpoint after runs of non-finite steps.
        initial_eval: The evaluation before the first step.
        consecutive_nonfinite: Non-finite steps in a row (not saved: a resume starts afresh).
        oom_skips: Steps in a row skipped for a sample too big for memory (not saved).
        attempts: Step attempts in this process, retries included (not saved).
        transforms: The model transforms whose own state is saved (e.g. the quantization λ).
    """

    stream: BatchStream
    scheduler: GearshiftLR
    phases: PhaseDriver
    task: Task
    callbacks: CallbackList
    scaler: Any
    seed: int
    total_steps: int
    schedule_interval: str
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    micro_limit: int | None = None
    rollbacks: int = 0
    initial_eval: dict[str, float] | None = None
    consecutive_nonfinite: int = 0
    oom_skips: int = 0
    attempts: int = 0
    transforms: TransformChain | None = None

    def count_window(self, window: list[Any], world_size: int) -> None:
        """Count a window's samples and tokens (once, however often the window is re-run)."""
        for batch in window:
            self.samples_seen += setup.batch_size_of(batch) * world_size
            self.tokens_seen += setup.tokens_of(batch) * world_size

    @property
    def epoch(self) -> int:
        """Epochs of the training data begun so far (0-based)."""
        return self.stream.position.epoch

    def state_dict(self) -> dict[str, Any]:
        """Everything besides weights and optimizer needed to continue exactly (JSON-safe)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "position": self.stream.position.state_dict(),
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "schedule": self.scheduler.state_dict(),
            "schedule_interval": self.schedule_interval,
            "rng": capture_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "callbacks": self.callbacks.state_dict(),
            "initial_eval": self.initial_eval,
            "micro_limit": self.micro_limit,
            "rollbacks": self.rollbacks,
            "task": self.task.state_dict(),
            "transforms": self.transforms.state_dict() if self.transforms is not None else {},
            **self.phases.json_state(),
        }

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state held as tensors: ``<name>.safetensors`` files of the checkpoint."""
        out = self.phases.tensor_files()
        task = self.task.tensor_state()
        if task:
            out[TASK_TENSORS] = task
        return out

    def load_state_dict(self, state: Mapping[str, Any],
                        tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                        ) -> list[str]:
        """Restore from a checkpoint's trainer state and tensors; returns notes on what won."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"trainer state version {state.get('version')} is not "
                                  f"supported (expected {STATE_VERSION})")
        tensors = tensors or {}
        notes = ["from the checkpoint: weights, optimizer, step, data position, RNG, schedule "
                 "position; from the config: run length, cadences, logging"]
        self.step = int(state["step"])
        self.stream.position.load_state_dict(state["position"], self.stream.global_batch)
        if state["seed"] != self.seed:
            notes.append(f"seed {state['seed']} from the checkpoint wins over {self.seed} "
                         "in the config (data order must not change mid-run)")
            self.seed = self.stream.seed = int(state["seed"])
        if state.get("total_steps") != self.total_steps:
            notes.append(f"run length {self.total_steps} steps from the config "
                         f"(the checkpoint's run planned {state.get('total_steps')})")
        notes.extend(restore_schedule(self.scheduler, state["schedule"]))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.initial_eval = state.get("initial_eval")
        self.micro_limit = state.get("micro_limit")
        # A rollback within this process never lowers the count (the checkpoint is older).
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        missing = self.callbacks.load_state_dict(state.get("callbacks", {}))
        if missing:
            notes.append(f"no saved state for callbacks {missing}: they start fresh")
        self.task.load_state_dict(state.get("task") or {})
        if TASK_TENSORS in tensors:
            self.task.load_tensor_state(tensors[TASK_TENSORS])
        notes.extend(self.phases.load(state, tensors))
        if self.transforms is not None:
            notes.extend(self.transforms.load_state_dict(state.get("transforms") or {}))
        restore_rng_state(state["rng"])
        return notes
