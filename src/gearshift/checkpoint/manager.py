"""Atomic, verified checkpoints of a run: save (now or in the background), list, find the newest
intact one, load.

A save copies the state into host memory, writes a complete checkpoint from it into a temporary
folder, fsyncs every file and the folder, renames it into place and only then moves ``latest``; a
crash at any moment leaves the previous checkpoint as ``latest``, intact. Leftovers of crashed
writers are cleaned by the next save.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn
from torch.optim import Optimizer

from gearshift.checkpoint.atomic import (
    encode_json,
    fsync_dir,
    pid_alive,
    replace_symlink,
    write_bytes,
)
from gearshift.checkpoint.layout import (
    LATEST_LINK,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_LAYOUT_FILE,
    OPTIMIZER_TENSORS_FILE,
    TRAINER_STATE_FILE,
    check_extra_name,
    make_temp_name,
    parse_step_dir,
    parse_temp_name,
    step_dir_name,
)
from gearshift.checkpoint.loading import LoadedCheckpoint, load_checkpoint
from gearshift.checkpoint.manifest import manifest_for, verify_checkpoint
from gearshift.checkpoint.optimizer_state import encode_optimizer_state
from gearshift.checkpoint.snapshot import Snapshot, TensorImage, model_tensors, serialize_tensors
from gearshift.checkpoint.writer import PendingSave, write_snapshot

# Temporary folders this process is writing right now; any other folder carrying our pid is a
# leftover from an earlier process that happened to get the same pid (common in containers).
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


class CheckpointManager:
    """Saves and loads the checkpoints of one run in ``<run_dir>/checkpoints``.

    Args:
        directory: The checkpoints folder; created on the first save.
        keep_last: How many checkpoints (newest by step) to keep after each save; the one
            ``latest`` points to is never deleted.
        write_hook: Called by the writer with each file's path once it is written and fsynced
            (fault injection: ``faults.checkpoint_write_delay_s`` slows the writer with it).

    Raises:
        ValueError: If ``keep_last`` is not an int >= 1.

    Example:
        >>> manager = CheckpointManager(run_dir / "checkpoints", keep_last=2)  # doctest: +SKIP
        >>> manager.save(200, model=model, optimizer=opt, trainer_state={"step": 200})
        >>> handle = manager.save(300, model=model, optimizer=opt, trainer_state={"step": 300},
        ...                       asynchronous=True)  # returns once the state is in host memory
        >>> handle.wait()  # the committed folder
        >>> path, skipped = manager.find_latest_valid()
        >>> loaded = manager.load(path, model=model, optimizer=opt)
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, *,
                 write_hook: Callable[[Path], None] | None = None) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.write_hook = write_hook
        self._in_flight: PendingSave | None = None
        # The memory of the last snapshot's tensor files, refilled by the next async snapshot.
        self._images: dict[str, TensorImage] = {}

    @overload
    def save(self, step: int, *, model: nn.Module | Mapping[str, torch.Tensor],
             optimizer: Optimizer | None = ..., trainer_state: Mapping[str, Any],
             extra_json: Mapping[str, Mapping[str, Any]] | None = ...,
             extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = ...,
             asynchronous: Literal[False] = ...) -> Path: ...

    @overload
    def save(self, step: int, *, model: nn.Module | Mapping[str, torch.Tensor],
             optimizer: Optimizer | None = ..., trainer_state: Mapping[str, Any],
             extra_json: Mapping[str, Mapping[str, Any]] | None = ...,
             extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = ...,
             asynchronous: Literal[True]) -> PendingSave: ...

    def save(
        self,
        step: int,
        *,
        model: nn.Module | Mapping[str, torch.Tensor],
        optimizer: Optimizer | None = None,
        trainer_state: Mapping[str, Any],
        extra_json: Mapping[str, Mapping[str, Any]] | None = None,
        extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        asynchronous: bool = False,
    ) -> Path | PendingSave:
        """Write the checkpoint for ``step`` atomically and point ``latest`` at it.

        The state is first copied into host memory as the checkpoint's files (a snapshot of
        everything given, taken now); the files are then written, hashed from memory, fsynced,
        renamed into place, ``latest`` is moved and retention deletes old checkpoints. With
        ``asynchronous=True`` that second part runs in a background thread and this call returns
        as soon as the snapshot is taken: training may change the model and optimizer at once.
        At most one save is in flight: a save waits for the previous one first
        (:attr:`PendingSave.waited_s` says how long).

        Args:
            step: The optimizer step (non-negative); names the folder ``step-XXXXXXXX``. Saving a
                step that exists replaces it; the old copy is removed only after the new one is in
                place.
            model: A module (tied weights stored once) or a mapping of tensors, e.g. adapter-only
                weights.
            optimizer: Its full state is stored when given.
            trainer_state: JSON-safe dict (step, epoch, data position, RNG, schedules, ...).
            extra_json: More JSON-safe dicts, each stored as ``<name>.json``.
            extra_tensors: More tensor dicts, each stored as ``<name>.safetensors``.
            asynchronous: Return after the snapshot with a :class:`PendingSave` whose ``wait()``
                gives the committed folder (or raises the writer's error).

        Returns:
            The checkpoint folder, or the handle of the background save.

        Raises:
            ValueError: If ``step``, a name or a JSON payload is invalid (nothing is written).
            Exception: The error of the previous background save if nobody was given it yet.
        """
        final = self.directory / step_dir_name(step)
        step = int(step)  # A numpy integer would not serialize into the manifest.
        start = time.perf_counter()
        payloads = _json_payloads(trainer_state, extra_json)
        if extra_tensors is not None:
            for name in extra_tensors:
                check_extra_name(name)
                if name in ("model",):
                    raise ValueError("extra_tensors name 'model' is used by the checkpoint itself")
        waited = self._finish_in_flight()
        snapshot = self._snapshot(step, model, optimizer, payloads, extra_tensors or {})
        if not asynchronous:
            path = self._write(snapshot, final)
            self._after_commit(snapshot, keep=False)
            return path
        handle = PendingSave(step, final, blocked_s=time.perf_counter() - start, waited_s=waited)
        self._in_flight = handle
        handle._run(lambda: self._write(snapshot, final),
                    then=lambda: self._after_commit(snapshot, keep=True))
        return handle

    @property
    def in_flight(self) -> PendingSave | None:
        """The background save still running (or finished but not waited for), if any."""
        return self._in_flight

    def wait(self) -> Path | None:
        """Wait for the background save, if any, retention included: its committed folder, or
        its error raised."""
        handle, self._in_flight = self._in_flight, None
        if handle is None:
            return None
        handle.join_quietly()
        return handle.wait()

    def _finish_in_flight(self) -> float:
        """Let the background save finish; seconds waited. Raises its error if never given."""
        handle, self._in_flight = self._in_flight, None
        if handle is None:
            return 0.0
        start = time.perf_counter()
        error = handle.join()
        if error is not None:
            raise error
        return time.perf_counter() - start

    def _snapshot(self, step: int, model: nn.Module | Mapping[str, torch.Tensor],
                  optimizer: Optimizer | None, payloads: dict[str, bytes],
                  extra_tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> Snapshot:
        """Every file's bytes in host memory, from the state as it is now."""
        reuse = self._images
        snapshot = Snapshot(step)
        tensors, metadata = model_tensors(model)
        snapshot.tensors[MODEL_FILE] = serialize_tensors(tensors, metadata, reuse.get(MODEL_FILE))
        for name, tensor_dict in extra_tensors.items():
            fname = f"{name}.safetensors"
            snapshot.tensors[fname] = serialize_tensors(dict(tensor_dict), None, reuse.get(fname))
        if optimizer is not None:
            opt_tensors, layout = encode_optimizer_state(optimizer.state_dict())
            snapshot.tensors[OPTIMIZER_TENSORS_FILE] = serialize_tensors(
                opt_tensors, None, reuse.get(OPTIMIZER_TENSORS_FILE))
            snapshot.payloads[OPTIMIZER_LAYOUT_FILE] = layout
        snapshot.payloads.update(payloads)
        return snapshot

    def _write(self, snapshot: Snapshot, final: Path) -> Path:
        """Write, commit, move ``latest`` (in the writer's thread when asynchronous)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clean_stale()
        tmp = self.directory / make_temp_name("tmp", final.name)
        with _ACTIVE_LOCK:
            _ACTIVE.add(tmp.name)
        try:
            tmp.mkdir()
            entries = write_snapshot(tmp, snapshot, self.write_hook)
            # The manifest is written last: a folder with a valid manifest is a complete checkpoint.
            manifest = manifest_for(snapshot.step, entries)
            write_bytes(tmp / MANIFEST_FILE, encode_json(manifest, MANIFEST_FILE))
            fsync_dir(tmp)
            self._commit(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(tmp.name)
        replace_symlink(self.directory / LATEST_LINK, final.name)
        return final

    def _after_commit(self, snapshot: Snapshot, keep: bool) -> None:
        """Retention, and keeping the snapshot's memory for the next one (after the commit)."""
        if keep:
            for image in snapshot.tensors.values():
                image.keep()
            self._images = dict(snapshot.tensors)
        else:
            self._images = {}
        self._apply_retention()

    def _commit(self, tmp: Path, final: Path) -> None:
        aside: Path | None = None
        if final.exists():
            # os.rename cannot replace a non-empty folder; the old copy waits under a name that
            # the stale cleanup restores if this process dies before the new copy is in place.
            aside = self.directory / make_temp_name("old", final.name)
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            if aside is not None:
                os.rename(aside, final)
            raise
        fsync_dir(self.directory)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _clean_stale(self) -> None:
        """Remove leftovers of writers that died (or of earlier processes with our pid)."""
        for entry in self.directory.iterdir():
            temp = parse_temp_name(entry.name)
            if temp is None:
                continue
            with _ACTIVE_LOCK:
                if entry.name in _ACTIVE:
                    continue
            if temp.pid != os.getpid() and pid_alive(temp.pid):
                continue
            if entry.is_symlink() or entry.is_file():
                entry.unlink(missing_ok=True)
            elif temp.kind == "old" and not (self.directory / temp.target).exists():
                # The writer died between moving the old copy aside and renaming the new one in.
                os.rename(entry, self.directory / temp.target)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        fsync_dir(self.directory)

    def _apply_retention(self) -> None:
        checkpoints = self.list_checkpoints()
        protected = self.latest()
        for path in checkpoints[: max(0, len(checkpoints) - self.keep_last)]:
            if protected is not None and path.name == protected.name:
                continue
            # Rename first so no reader ever sees a half-deleted step-* folder.
            doomed = self.directory / make_temp_name("del", path.name)
            try:
                os.rename(path, doomed)
                shutil.rmtree(doomed)
            except OSError as exc:
                warnings.warn(f"could not delete old checkpoint {path}: {exc}", stacklevel=3)
        fsync_dir(self.directory)

    def list_checkpoints(self) -> list[Path]:
        """Return the ``step-*`` checkpoint folders, oldest step first (temporary ones never).

        Returns:
            Folder paths sorted by step ascending; ``[]`` if the directory does not exist.
        """
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            step = parse_step_dir(entry.name)
            if step is not None and entry.is_dir() and not entry.is_symlink():
                found.append((step, entry))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """Return the checkpoint ``latest`` points to, or None if it is absent or dangling."""
        link = self.directory / LATEST_LINK
        if not link.is_symlink():
            return None
        target = self.directory / os.readlink(link)
        return target if target.is_dir() else None

    def find_latest_valid(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """Return the newest checkpoint that verifies, and the newer ones skipped as corrupt.

        Corrupt checkpoints are reported, never deleted.

        Returns:
            ``(path or None, [(skipped_path, reason), ...])`` with skipped ones newest first.
        """
        skipped: list[tuple[Path, str]] = []
        for path in reversed(self.list_checkpoints()):
            problems = verify_checkpoint(path)
            if not problems:
                return path, skipped
            skipped.append((path, "; ".join(problems)))
        return None, skipped

    def load(
        self,
        path: str | Path,
        *,
        model: nn.Module | None = None,
        optimizer: Optimizer | None = None,
        strict: bool = True,
    ) -> LoadedCheckpoint:
        """Verify a checkpoint, then load its weights into ``model`` and state into ``optimizer``.

        Everything is checked before anything is changed: a failed load leaves ``model`` and
        ``optimizer`` untouched.

        Args:
            path: The checkpoint folder (or the ``latest`` link).
            model: Receives the weights when given.
            optimizer: Receives the optimizer state when given; the checkpoint must have one.
            strict: Require the stored tensor names to match the model exactly (tied weights may
                be stored once). Pass False to load a subset such as an adapter. Shapes must
                always match.

        Returns:
            The step, trainer state and extra JSON of the checkpoint.

        Raises:
            CheckpointError: If the checkpoint is corrupt, cannot be parsed, or does not fit the
                model or optimizer; the message names the checkpoint and the file or tensor.
        """
        return load_checkpoint(Path(path), model=model, optimizer=optimizer, strict=strict)



def _json_payloads(trainer_state: Mapping[str, Any],
                   extra_json: Mapping[str, Mapping[str, Any]] | None) -> dict[str, bytes]:
    """Every JSON file's bytes, encoded up front so a bad value fails before anything is written."""
    if not isinstance(trainer_state, Mapping):
        raise ValueError(f"trainer_state must be a mapping, got {type(trainer_state).__name__}")
    payloads = {TRAINER_STATE_FILE: encode_json(dict(trainer_state), "trainer_state")}
    for name, obj in (extra_json or {}).items():
        check_extra_name(name)
        if not isinstance(obj, Mapping):
            raise ValueError(f"extra_json[{name!r}] must be a mapping, got {type(obj).__name__}")
        payloads[f"{name}.json"] = encode_json(dict(obj), f"extra_json[{name!r}]")
    return payloads
