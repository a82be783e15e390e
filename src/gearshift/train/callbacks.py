"""Callbacks: named hooks into the training loop, with state saved in checkpoints."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gearshift.train.trainer import RunResult, Trainer


class Callback:
    """Subclass and override the events you need. Every event gets the trainer.

    Set ``trainer.should_stop = True`` from any event to end the run after the current step
    (a checkpoint is written). Override :meth:`state_dict` / :meth:`load_state_dict` to keep
    JSON-safe state across resumes; it is stored under the callback's :attr:`state_key`.

    Example:
        >>> class StopAtLoss(Callback):
        ...     def on_step_end(self, trainer, metrics):
        ...         if metrics["loss"] < 2.0:
        ...             trainer.should_stop = True
    """

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None: ...
    def on_train_end(self, trainer: Trainer, result: RunResult) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class CallbackList:
    """Dispatches each event to every callback, in order."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = list(callbacks)
        keys = [c.state_key for c in self.callbacks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two callbacks share a state_key: {keys}; override state_key")

    def fire(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)

    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore each callback's state; returns the keys that had no saved state."""
        missing = []
        for cb in self.callbacks:
            if cb.state_key in state:
                cb.load_state_dict(state[cb.state_key])
            elif cb.state_dict():  # a callback without state has nothing to miss
                missing.append(cb.state_key)
        return missing
