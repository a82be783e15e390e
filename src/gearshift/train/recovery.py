"""Surviving out-of-memory errors and non-finite steps, plus the documented fault injection.

Out of memory: the window's gradients are dropped and the same samples are re-run in smaller
micro-batches (halving down to one sample), so no sample is skipped and the update equals the one
without the error to float tolerance; the smaller size is kept for later steps. Only when a single
sample does not fit is the step skipped.

Fault injection (for tests and drills, settable with ``--set``): ``faults.oom_when_batch_above: N``
raises a genuine ``torch.OutOfMemoryError`` whenever a forward pass receives more than ``N``
samples; ``faults.nan_at_steps: [..]`` makes the loss of those optimizer steps NaN — each entry spoils one
attempt, so ``[6, 6, 6]`` fails step 6 three times in a row (enough to trigger a rollback).
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gearshift.train import setup
from gearshift.train.interrupt import TrainingDiverged

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


def _samples_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0


def install_oom_fault(model: nn.Module, limit: int) -> torch.utils.hooks.RemovableHandle:
    """Make ``model``'s forward raise ``torch.OutOfMemoryError`` above ``limit`` samples."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        n = _samples_in(args, kwargs)
        if n > limit:
            raise torch.OutOfMemoryError(
                f"out of memory: a forward pass of {n} samples (injected by "
                f"faults.oom_when_batch_above={limit})")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


class RecoveryMixin:
    """The trainer's answers to out-of-memory errors and runs of non-finite steps."""

    def _shrink_after_oom(self, window: list[Any], exc: BaseException) -> bool:
        """Halve the micro-batch after an OOM; False (step skipped) when one sample is too big."""
        self.optimizer.zero_grad(set_to_none=True)  # partial gradients of the failed attempt
        free_memory()
        largest = max(setup.batch_size_of(b) for b in window)
        current = min(self.micro_limit or largest, largest)
        if current <= 1:
            self.oom_skips += 1
            self.logger.log_event(self.step, "oom_skip", error=str(exc)[:300])
            self._print(f"out of memory on a single sample at step {self.step + 1}: step skipped")
            if self.oom_skips >= self.config.recovery.max_consecutive_oom_skips:
                raise TrainingDiverged(
                    f"{self.oom_skips} steps in a row ran out of memory with one sample per "
                    "forward pass; lower data.seq_len, use precision bf16 or "
                    "gradient_checkpointing, or a machine with more memory")
            return False
        self.micro_limit = (current + 1) // 2
        self.logger.log_event(self.step, "oom_recovery", micro_batch=self.micro_limit,
                              error=str(exc)[:300])
        self._print(f"out of memory at step {self.step + 1}: re-running the batch in "
                    f"micro-batches of {self.micro_limit}")
        return True

    def _shrink_eval_after_oom(self, batch: Any, exc: BaseException) -> bool:
        """Halve the micro-batch after an OOM in evaluation; False when one sample is too big."""
        free_memory()
        current = min(self.micro_limit or setup.batch_size_of(batch), setup.batch_size_of(batch))
        if current <= 1:
            return False
        self.micro_limit = (current + 1) // 2
        self.logger.log_event(self.step, "oom_recovery", micro_batch=self.micro_limit,
                              during="evaluation", error=str(exc)[:300])
        return True

    def _rollback(self) -> None:
        """Return to the newest valid checkpoint with a lower LR, or stop with a clear message."""
        rec = self.config.recovery
        n = self.consecutive_nonfinite
        if self.rollbacks >= rec.max_rollbacks:
            raise TrainingDiverged(
                f"{n} non-finite steps in a row at step {self.step} after {self.rollbacks} "
                f"rollback(s) (recovery.max_rollbacks={rec.max_rollbacks}); lower the learning "
                "rate or check the data, then resume from the last good checkpoint")
        factor_in_force = self.scheduler.scale("rollback")
        found, _ = self._load_newest(self.ckpt)
        if found is None:
            raise TrainingDiverged(
                f"{n} non-finite steps in a row at step {self.step} and no checkpoint to roll "
                "back to; lower the learning rate or checkpoint more often (checkpoint.every)")
        path = found[0]
        self.rollbacks += 1
        self.consecutive_nonfinite = 0
        # The checkpoint's schedule carries the factor of its own time; the new one compounds
        # the factor in force when the run diverged.
        lr_factor = factor_in_force * rec.rollback_lr_factor
        self.scheduler.set_scale("rollback", lr_factor)
        self.logger.truncate_after(self.step)
        self.logger.log_event(self.step, "rollback", checkpoint=str(path), reason=f"{n} "
                              "non-finite steps in a row", lr_factor=lr_factor)
        self._print(f"{n} non-finite steps in a row: rolled back to {path.name} with the LR "
                    f"scaled by {lr_factor:g}")
