"""What the daemon adds to each file's run, as a training callback: progress in the status
file, the per-file peak memory, ``daemon.max_memory_mb``, and the stop file."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from gearshift.daemon.status import StatusFile
from gearshift.train import Callback


class PeakMemory:
    """The peak memory of the current file, in MiB: CUDA peak allocated on a GPU, else the
    process's peak resident set size since :meth:`reset` (Linux resets it through
    ``/proc/self/clear_refs``; elsewhere the largest RSS seen at the sampling points)."""

    def __init__(self) -> None:
        self.peak = 0.0

    def reset(self, *, keep_peak: bool = False) -> None:
        """Start measuring again (``keep_peak``: the file's peak so far is kept)."""
        if not keep_peak:
            self.peak = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # resets VmHWM, the high-water mark of the resident set
        except OSError:
            pass

    def sample(self) -> float:
        """The peak since the last reset (now included), remembered as the file's peak."""
        if torch.cuda.is_available():
            value = torch.cuda.max_memory_allocated() / 2**20
        else:
            value = _vm_hwm_mb()
            if value is None:
                import psutil

                value = psutil.Process().memory_info().rss / 2**20
        self.peak = max(self.peak, value)
        return value


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class DaemonHooks(Callback):
    """Reports a file's progress to the status file and enforces the daemon's limits.

    Args:
        status: The daemon's status file.
        memory: The per-file peak memory meter.
        should_stop: True when the daemon was asked to stop: the run then stops gracefully
            (as on SIGTERM: this step is finished and checkpointed).
        max_memory_mb: ``daemon.max_memory_mb`` (None: no limit).
        say: Writes one line to the daemon's log.
    """

    def __init__(self, status: StatusFile, memory: PeakMemory, should_stop: Callable[[], bool],
                 max_memory_mb: float | None, say: Callable[[str], Any] = print) -> None:
        self.status = status
        self.memory = memory
        self.should_stop = should_stop
        self.max_memory_mb = max_memory_mb
        self.say = say
        self._t0 = time.monotonic()
        self._step0 = 0
        self._stop_sent = False

    @property
    def state_key(self) -> str:
        return "daemon"

    def on_train_start(self, trainer: Any) -> None:
        self._t0, self._step0 = time.monotonic(), trainer.step
        self.status.update(current_step=trainer.step, total_steps=trainer.state.total_steps,
                           write=True)

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        step, total = trainer.step, trainer.state.total_steps
        done = step - self._step0
        eta = (time.monotonic() - self._t0) / done * (total - step) if done > 0 else None
        step_peak = self.memory.sample()
        self.status.update(current_step=step, total_steps=total, loss=metrics.get("loss"),
                           learning_rate=metrics.get("lr"), eta_seconds=eta,
                           peak_memory_mb=self.memory.peak)
        if self.max_memory_mb is not None and step_peak > self.max_memory_mb:
            self._shrink(trainer, step_peak)
        if not self._stop_sent and self.should_stop():
            self._stop_sent = True
            self.status.update(state="stopping", write=True)
            # The loop's own graceful stop: finish this step, checkpoint, raise.
            os.kill(os.getpid(), signal.SIGTERM)

    def _shrink(self, trainer: Any, step_peak: float) -> None:
        s = trainer.state
        current = s.micro_limit or trainer.config.training.batch_size
        self.memory.reset(keep_peak=True)  # the next step's peak is judged on its own
        if current <= 1:
            self.say(f"step {s.step}: peak memory {step_peak:,.0f} MiB is above "
                     f"daemon.max_memory_mb={self.max_memory_mb:g} with one sample per forward "
                     "pass; going on")
            return
        s.micro_limit = (current + 1) // 2
        trainer.logger.log_event(s.step, "memory_limit", peak_memory_mb=step_peak,
                                 max_memory_mb=self.max_memory_mb, micro_batch=s.micro_limit)
        self.say(f"step {s.step}: peak memory {step_peak:,.0f} MiB above "
                 f"daemon.max_memory_mb={self.max_memory_mb:g}; micro-batches of "
                 f"{s.micro_limit} from now on")


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
