"""Graceful stop on Ctrl-C / SIGTERM: finish the step, checkpoint, say how to resume."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from gearshift.errors import GearshiftError


class TrainingInterrupted(Exception):
    """Raised after a graceful stop; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class TrainingDiverged(GearshiftError):
    """Non-finite steps persisted after every allowed rollback (exit code 3)."""

    exit_code = 3


class StopRequest:
    """Installs SIGINT / SIGTERM handlers for the duration of a ``with`` block.

    The first signal only sets :attr:`signum`, so the loop can end the current optimizer step
    and write a checkpoint; a second SIGINT aborts at once with ``KeyboardInterrupt``.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: finishing this step and writing a checkpoint "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
