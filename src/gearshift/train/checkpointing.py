"""The run's checkpoints: save the :class:`TrainState` with weights and optimizer, resume from
the newest one that verifies and fits, export the final model, and fail clearly on a full disk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from torch import nn
from torch.optim import Optimizer

from gearshift.checkpoint import CheckpointManager
from gearshift.config.schema import CheckpointConfig
from gearshift.errors import CheckpointError
from gearshift.rundir import RunPaths
from gearshift.train.logger import RunLogger
from gearshift.train.memory import peak_memory_mb
from gearshift.train.state import TrainState
from gearshift.transforms import TransformChain

# safetensors reports I/O failures (disk full, permission denied) with its own error type.
STORAGE_ERRORS = (OSError, SafetensorError)


@dataclass
class Checkpoints:
    """Saving and loading one run's checkpoints.

    Args:
        directory: ``RUN_DIR/checkpoints``.
        config: The ``checkpoint`` section.
        state: The run's state, saved and restored as one.
        accelerator: Ranks (only the main process writes).
        model: The unwrapped model.
        optimizer: The prepared optimizer.
        transforms: Decide which tensors a checkpoint holds and how the final model is written.
        say: Prints one line for the user.
    """

    directory: Path
    config: CheckpointConfig
    state: TrainState
    accelerator: Accelerator
    model: nn.Module
    optimizer: Optimizer
    transforms: TransformChain
    say: Callable[[str], None]
    #: Where events go once the run's logger exists (set by the trainer).
    logger: RunLogger | None = None

    def __post_init__(self) -> None:
        self.manager = CheckpointManager(self.directory, keep_last=self.config.keep_last)

    def _event(self, kind: str, **fields: Any) -> None:
        if self.logger is not None:
            self.logger.log_event(self.state.step, kind, **fields)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (main process only); its path."""
        acc, step = self.accelerator, self.state.step
        acc.wait_for_everyone()
        path = None
        failure: list[str | None] = [None]
        if acc.is_main_process:
            try:
                path = self.manager.save(step, model=self.transforms.checkpoint_weights(self.model),
                                         optimizer=self.optimizer,
                                         trainer_state=self.state.state_dict(),
                                         extra_tensors=self.state.tensors() or None)
            except STORAGE_ERRORS as exc:
                failure = [self.storage_failure(f"checkpoint of step {step}", exc)]
            else:
                self._event("checkpoint", path=str(path),
                            peak_memory_mb=peak_memory_mb(acc.device))
        acc.wait_for_everyone()
        if acc.num_processes > 1:
            broadcast_object_list(failure)  # every rank stops together, none waits forever
        if failure[0] is not None:
            raise CheckpointError(failure[0])
        return path

    def load_newest(self, manager: CheckpointManager | None = None,
                    ) -> tuple[Path | None, list[str], list[str]]:
        """Load the newest checkpoint that verifies *and* fits: (path, skipped, notes).

        A checkpoint can pass its manifest yet not fit (a tensor of the wrong shape written by
        other code); loading checks everything before it changes anything, so the next older
        one can simply be tried.
        """
        manager = manager or self.manager
        skipped: list[str] = []
        for path in reversed(manager.list_checkpoints()):
            try:
                loaded = manager.load(path, model=self.model, optimizer=self.optimizer,
                                      strict=self.transforms.strict)
                notes = self.state.load_state_dict(loaded.trainer_state, loaded.tensors)
            except CheckpointError as exc:
                skipped.append(f"{path.name}: {exc}")
                continue
            return path, skipped, notes
        return None, skipped, []

    def resume(self, run_dir: Path) -> tuple[Path, list[str], list[str]]:
        """Continue from ``run_dir``'s newest valid checkpoint: (path, skipped, notes)."""
        directory = RunPaths(run_dir).checkpoints
        manager = CheckpointManager(directory, keep_last=self.config.keep_last)
        path, skipped, notes = self.load_newest(manager)
        for line in skipped:
            self.say(f"skipping corrupt checkpoint {line}")
        if path is None:
            raise CheckpointError(
                f"no valid checkpoint in {directory}" + (f" ({len(skipped)} corrupt)" if skipped
                                                         else "") +
                "; start a new run instead of resuming")
        self.say(f"resumed from {path} at step {self.state.step}")
        for note in notes:
            self.say(f"  {note}")
        return path, skipped, notes

    def export_final(self, directory: Path, tokenizer: Any) -> Path | None:
        """Write ``final/`` (main process only) as the transforms export it."""
        if not self.accelerator.is_main_process:
            return None
        try:
            return self.transforms.export(self.model, directory, tokenizer=tokenizer)
        except STORAGE_ERRORS as exc:
            failure = self.storage_failure("final model export", exc)
            if failure is not None:
                raise CheckpointError(failure) from exc
        return None

    def storage_failure(self, what: str, exc: Exception) -> str | None:
        """Disk full / permission denied: the message to stop with, or None after a warning
        (``checkpoint.on_error: warn``)."""
        latest, _ = self.manager.find_latest_valid()
        kept = f"the previous checkpoint {latest.name} is intact" if latest else \
            "no earlier checkpoint exists"
        self._event("checkpoint_failed", what=what, error=str(exc))
        reason = getattr(exc, "strerror", None) or str(exc).split(": ")[-1]
        run_dir = self.manager.directory.parent
        message = f"could not write the {what} in {run_dir} ({reason}); {kept}"
        if self.config.on_error == "warn":
            self.say(f"warning: {message}; training goes on (checkpoint.on_error: warn)")
            return None
        return f"{message}. Free space or fix permissions, then run: gearshift resume {run_dir}"
