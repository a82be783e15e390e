"""The run's checkpoints: save the :class:`TrainState` with weights and optimizer (in the
background with ``checkpoint.async``), resume from the newest one that verifies and fits, export
the final model, and fail clearly on a full disk.

With ``checkpoint.async`` the loop blocks only while the state is copied to host memory; the
writer's outcome is collected at the next steps (:meth:`Checkpoints.poll`): a committed checkpoint
is announced then (``checkpoint`` event, ``on_checkpoint``), a failure is handled there exactly as
a synchronous one (``checkpoint.on_error``). With several processes only the main process writes
(every rank's state is the same); all ranks learn the outcome together, at the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from torch import nn
from torch.optim import Optimizer

from gearshift.checkpoint import CheckpointManager, PendingSave
from gearshift.config.schema import CheckpointConfig, DistributedConfig
from gearshift.errors import CheckpointError
from gearshift.rundir import RunPaths
from gearshift.train.logger import RunLogger
from gearshift.train.memory import process_peak_mb
from gearshift.train.state import TrainState
from gearshift.train.strategy import Strategy
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
    #: Called on every rank with each checkpoint once it is committed (set by the trainer).
    on_commit: Callable[[Path], None] | None = None
    #: Sleeps after each file the writer writes (``faults.checkpoint_write_delay_s``).
    write_delay_s: float = 0.0
    #: How the weights and optimizer state of the prepared model are read and written back
    #: (``distributed.strategy``; default: as they are, data parallel).
    strategy: Strategy | None = None

    def __post_init__(self) -> None:
        if self.strategy is None:
            self.strategy = Strategy(DistributedConfig())
        hook = None
        if self.write_delay_s > 0:
            def hook(path: Path) -> None:
                time.sleep(self.write_delay_s)
        self.manager = CheckpointManager(self.directory, keep_last=self.config.keep_last,
                                         write_hook=hook)
        self.asynchronous = self.config.async_
        #: The step of the save in flight (known on every rank), and its handle (main process).
        self.pending_step: int | None = None
        self._handle: PendingSave | None = None
        self._committed: Path | None = None  # a synchronous save's folder, until collected
        self._writer: PendingSave | None = None  # the last background save (retention after it)
        #: The last committed checkpoint (main process) and its step (every rank).
        self.last: Path | None = None
        self.last_step: int | None = None
        self._said_wait = False

    def _event(self, kind: str, step: int | None = None, **fields: Any) -> None:
        if self.logger is not None:
            self.logger.log_event(self.state.step if step is None else step, kind, **fields)

    def save(self, wait: bool = False) -> Path | None:
        """Checkpoint the current step: the committed folder (main process), or None while it
        is written in the background (``checkpoint.async``, unless ``wait``)."""
        acc, step = self.accelerator, self.state.step
        self.finish(reason=f"the checkpoint of step {step}")  # at most one save in flight
        self._decide_mode()
        acc.wait_for_everyone()
        failure: list[str | None] = [None]
        # Every rank takes part: a sharded model's state is gathered to the main process.
        strategy = self.strategy
        weights = strategy.model_state(self.model, self.transforms.checkpoint_weights(self.model))
        optimizer = strategy.optimizer_for_save(self.model, self.optimizer)
        tensors = self.state.tensors()
        if acc.is_main_process:
            try:
                result = self.manager.save(
                    step, model=weights, optimizer=optimizer,
                    trainer_state=self.state.state_dict(),
                    extra_tensors=tensors or None, asynchronous=self.asynchronous)
            except STORAGE_ERRORS as exc:
                failure = [self.storage_failure(f"checkpoint of step {step}", exc)]
            else:
                if isinstance(result, PendingSave):
                    self._handle = result
                    self._event("checkpoint_snapshot", checkpoint_step=step,
                                blocked_s=round(result.blocked_s, 4))
                else:
                    self._committed = result
        if not self.asynchronous:
            acc.wait_for_everyone()
        if acc.num_processes > 1:
            broadcast_object_list(failure)  # every rank stops together, none waits forever
        if failure[0] is not None:
            raise CheckpointError(failure[0])
        self.pending_step = step
        return self.finish(reason="a stop or the end of the run") \
            if wait or not self.asynchronous else None

    def poll(self) -> Path | None:
        """Collect the save in flight if its writer is done: the committed folder (main
        process), or its failure handled as ``checkpoint.on_error`` says. Call it on every rank
        at the same steps."""
        if self.pending_step is None:
            return None
        done = [self._handle is None or self._handle.done()]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(done)  # the main process decides; every rank follows
        return self._collect() if done[0] else None

    def finish(self, reason: str | None = None) -> Path | None:
        """Wait for the save in flight (before the next save, a rollback, a graceful stop, the
        end of the run): as :meth:`poll`. ``reason`` names why, for the wait's event."""
        if self.pending_step is None:
            return None
        if self._handle is not None and not self._handle.done():
            start = time.perf_counter()
            self._handle.join_quietly()
            waited = time.perf_counter() - start
            self._event("checkpoint_wait", checkpoint_step=self.pending_step,
                        waited_s=round(waited, 4), reason=reason or "the end of the run")
            if (reason is not None and reason.startswith("the checkpoint") and not self._said_wait
                    and waited >= 0.1):  # a few ms of overlap is no reason for advice
                self._said_wait = True
                self.say(f"waited {waited:.1f}s for the checkpoint of step {self.pending_step} "
                         f"to be written before {reason} (checkpoints come faster than the "
                         "disk writes them; raise checkpoint.every)")
        return self._collect()

    def _collect(self) -> Path | None:
        step, handle, committed = self.pending_step, self._handle, self._committed
        self.pending_step, self._handle, self._committed = None, None, None
        self._writer = handle or self._writer
        failure: list[str | None] = [None]
        if handle is not None:
            try:
                committed = handle.wait()
            except STORAGE_ERRORS as exc:
                failure = [self.storage_failure(f"checkpoint of step {step}", exc)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(failure)
        if failure[0] is not None:
            raise CheckpointError(failure[0])
        self.last_step = step
        if committed is None:
            return None
        fields = {"write_s": round(handle.write_s or 0.0, 4)} if handle is not None else {}
        # Logged at the checkpoint's step (a resume from it keeps the event); when it was
        # collected is ``committed_at_step``.
        self._event("checkpoint", step, path=str(committed), checkpoint_step=step,
                    committed_at_step=self.state.step,
                    peak_memory_mb=process_peak_mb(self.accelerator.device), **fields)
        self.last = committed
        if self.on_commit is not None:
            self.on_commit(committed)
        return committed

    def _decide_mode(self) -> None:
        """Fall back to synchronous saves where host memory could not hold the state's copy."""
        if not self.asynchronous:
            return
        fits = [True]
        if self.accelerator.is_main_process:
            params = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
            need = 3 * params  # weights and, with AdamW, two moments per parameter
            free = available_host_memory()
            if free is not None and need > free // 2:
                fits = [False]
                self.say(f"checkpoint.async: about {need / 2**30:.1f} GiB of state but only "
                         f"{free / 2**30:.1f} GiB of host memory available; checkpoints are "
                         "written synchronously")
        if self.accelerator.num_processes > 1:
            broadcast_object_list(fits)
        self.asynchronous = fits[0]

    def drain(self) -> None:
        """Let the writer finish everything, retention included (a run that ends or leaves by
        an error); never raises."""
        for handle in (self._handle, self._writer):
            if handle is not None:
                handle.join_quietly()

    def load_newest(self, manager: CheckpointManager | None = None,
                    ) -> tuple[Path | None, list[str], list[str]]:
        """Load the newest checkpoint that verifies *and* fits: (path, skipped, notes).

        A checkpoint can pass its manifest yet not fit (a tensor of the wrong shape written by
        other code); loading checks everything before it changes anything, so the next older
        one can simply be tried. A save in flight is finished first (a rollback wants it).
        """
        if manager is None:
            self.finish(reason="a rollback")
            self.drain()  # retention, still in the writer's thread, must not race the listing
        manager = manager or self.manager
        skipped: list[str] = []
        for path in reversed(manager.list_checkpoints()):
            try:
                strategy = self.strategy
                loaded = manager.load(
                    path, model=strategy.model_for_load(self.model),
                    optimizer=strategy.optimizer_for_load(self.model, self.optimizer),
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
        """Write ``final/`` (main process only) as the transforms export it (every rank calls
        it: a sharded model is gathered first)."""
        model = self.strategy.export_model(self.model, self.accelerator.is_main_process)
        if not self.accelerator.is_main_process or model is None:
            return None
        try:
            return self.transforms.export(model, directory, tokenizer=tokenizer)
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


def available_host_memory() -> int | None:
    """Bytes of host memory available (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
