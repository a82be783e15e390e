"""Surviving out-of-memory errors and non-finite steps, plus the documented fault injection.

Out of memory: the window's gradients are dropped and the same samples are re-run in smaller
micro-batches (halving down to one sample), so no sample is skipped and the update equals the one
without the error to float tolerance; the smaller size is kept for later steps. Only when a single
sample does not fit is the step skipped.

Non-finite steps: the step is skipped (no update; neither the schedule nor the phase statistics
count it); after ``recovery.max_consecutive_nonfinite`` in a row the run rolls back to the newest
valid checkpoint with the LR scaled by ``recovery.rollback_lr_factor`` (the scheduler's
``rollback`` scale), or stops with a clear message.

The fault injection used to drill all this is in :mod:`gearshift.train.faults`.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gearshift.config.schema import RecoveryConfig
from gearshift.train import setup
from gearshift.train.interrupt import TrainingDiverged
from gearshift.train.state import TrainState

OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory",
                "failed to allocate")


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA, MPS or the CPU allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError | MemoryError) and any(
        m in str(exc).lower() for m in OOM_MESSAGES)


def free_memory() -> None:
    """Release what can be released after an out-of-memory error."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_batch(batch: Any, size: int) -> list[Any]:
    """Cut a collated batch into pieces of at most ``size`` samples along dimension 0."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(size))
    if isinstance(batch, Mapping):
        parts = {k: split_batch(v, size) for k, v in batch.items()}
        n = max(len(p) for p in parts.values())
        return [{k: (p[i] if len(p) == n else p[0]) for k, p in parts.items()} for i in range(n)]
    if isinstance(batch, list | tuple):
        parts_seq = [split_batch(v, size) for v in batch]
        n = max(len(p) for p in parts_seq)
        return [type(batch)(p[i] if len(p) == n else p[0] for p in parts_seq) for i in range(n)]
    return [batch]


class Recovery:
    """The loop's answers to out-of-memory errors and runs of non-finite steps.

    Args:
        config: The ``recovery`` section.
        state: The run's :class:`TrainState` (micro-batch limit, counters, scheduler).
        log_event: Writes one record to ``events.jsonl``.
        roll_back: Loads the newest valid checkpoint into the run; its path, or None.
        say: Prints one line for the user.
    """

    def __init__(self, config: RecoveryConfig, state: TrainState,
                 log_event: Callable[..., None], roll_back: Callable[[], Path | None],
                 say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
        self.config = config
        self.state = state
        self.log_event = log_event
        self.roll_back = roll_back
        self.say = say

    def pieces(self, batch: Any) -> list[Any]:
        """The batch cut to the micro-batch limit in force (itself when there is none)."""
        limit = self.state.micro_limit
        return [batch] if limit is None else split_batch(batch, limit)

    def retry(self, attempt: Callable[[], torch.Tensor], window: list[Any],
              optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Run ``attempt`` until it fits in memory; None when the step has to be skipped."""
        # A failed try leaves partial gradients behind: drop them before the next one.
        return self._until_it_fits(attempt, window, None,
                                   lambda: optimizer.zero_grad(set_to_none=True))

    def retry_eval(self, attempt: Callable[[], torch.Tensor], batch: Any) -> torch.Tensor:
        """Run one evaluation ``attempt`` until it fits in memory."""
        out = self._until_it_fits(attempt, [batch], "evaluation")
        if out is None:
            raise self._diverged(
                "evaluation runs out of memory with one sample per forward pass; "
                "lower data.max_eval_sequences or data.seq_len, or use bf16")
        return out

    def _until_it_fits(self, attempt: Callable[[], torch.Tensor], window: list[Any],
                       during: str | None, drop: Callable[[], None] | None = None,
                       ) -> torch.Tensor | None:
        while True:
            try:
                return attempt()
            except Exception as exc:
                if not (self.config.oom and is_oom(exc)):
                    raise
                if drop is not None:
                    drop()
                if not self._shrink(window, exc, during):
                    return None

    def _shrink(self, window: list[Any], exc: BaseException, during: str | None = None) -> bool:
        """Halve the micro-batch after an OOM; False when one sample is already too big."""
        s = self.state
        free_memory()
        largest = max(setup.batch_size_of(b) for b in window)
        current = min(s.micro_limit or largest, largest)
        if current <= 1:
            if during is not None:
                return False
            s.oom_skips += 1
            self.log_event(s.step, "oom_skip", error=str(exc)[:300])
            self.say(f"out of memory on a single sample at step {s.step + 1}: step skipped")
            if s.oom_skips >= self.config.max_consecutive_oom_skips:
                raise self._diverged(
                    f"{s.oom_skips} steps in a row ran out of memory with one sample per "
                    "forward pass; lower data.seq_len, use precision bf16 or "
                    "gradient_checkpointing, or a machine with more memory")
            return False
        s.micro_limit = (current + 1) // 2
        where = {} if during is None else {"during": during}
        self.log_event(s.step, "oom_recovery", micro_batch=s.micro_limit, **where,
                       error=str(exc)[:300])
        if during is None:
            self.say(f"out of memory at step {s.step + 1}: re-running the batch in "
                     f"micro-batches of {s.micro_limit}")
        return True

    def _diverged(self, message: str) -> TrainingDiverged:
        """The error that stops a diverged run, recorded first as a ``diverged`` event so that
        readers of the run directory (report, compare) can tell it from a kill."""
        self.log_event(self.state.step, "diverged", reason=message)
        return TrainingDiverged(message)

    def step_done(self) -> None:
        """A finite step went through: the streaks end."""
        self.state.consecutive_nonfinite = 0
        self.state.oom_skips = 0

    def nonfinite(self, loss: float, grad_norm: float) -> None:
        """Count a skipped non-finite step; roll back after too many in a row."""
        s = self.state
        s.consecutive_nonfinite += 1
        self.log_event(s.step, "nonfinite_skip", loss=loss, grad_norm=grad_norm,
                       consecutive=s.consecutive_nonfinite)
        if s.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
            self._rollback()

    def _rollback(self) -> None:
        """Return to the newest valid checkpoint with a lower LR, or stop with a clear message."""
        rec, s = self.config, self.state
        n = s.consecutive_nonfinite
        if s.rollbacks >= rec.max_rollbacks:
            raise self._diverged(
                f"{n} non-finite steps in a row at step {s.step} after {s.rollbacks} "
                f"rollback(s) (recovery.max_rollbacks={rec.max_rollbacks}); lower the learning "
                "rate or check the data, then resume from the last good checkpoint")
        factor_in_force = s.scheduler.scale("rollback")
        path = self.roll_back()
        if path is None:
            raise self._diverged(
                f"{n} non-finite steps in a row at step {s.step} and no checkpoint to roll "
                "back to; lower the learning rate or checkpoint more often (checkpoint.every)")
        s.rollbacks += 1
        s.consecutive_nonfinite = 0
        # The checkpoint's schedule carries the factor of its own time; the new one compounds
        # the factor in force when the run diverged.
        lr_factor = factor_in_force * rec.rollback_lr_factor
        s.scheduler.set_scale("rollback", lr_factor)
        self.log_event(s.step, "rollback", checkpoint=str(path), reason=f"{n} non-finite "
                       "steps in a row", lr_factor=lr_factor)
        self.say(f"{n} non-finite steps in a row: rolled back to {path.name} with the LR "
                 f"scaled by {lr_factor:g}")
