"""Atomic, verified checkpoints of a run: save, list, find the newest intact one, load.

A save writes a complete checkpoint into a temporary folder, fsyncs it, renames it into place and
only then moves ``latest``; a crash at any moment leaves the previous checkpoint as ``latest``,
intact. Leftovers of crashed writers are cleaned by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim import Optimizer

from gearshift.checkpoint.atomic import (
    encode_json,
    fsync_dir,
    fsync_file,
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
from gearshift.checkpoint.manifest import build_manifest, read_manifest, verify_checkpoint
from gearshift.checkpoint.model_state import (
    check_fits,
    load_into_model,
    read_shapes,
    save_model_weights,
)
from gearshift.checkpoint.optimizer_state import load_optimizer_state, save_optimizer_state
from gearshift.errors import CheckpointError

# Temporary folders this process is writing right now; any other folder carrying our pid is a
# leftover from an earlier process that happened to get the same pid (common in containers).
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()
_NOT_EXTRA = frozenset({TRAINER_STATE_FILE, OPTIMIZER_LAYOUT_FILE, MANIFEST_FILE})


@dataclass
class LoadedCheckpoint:
    """What :meth:`CheckpointManager.load` read besides the weights and optimizer state.

    Attributes:
        path: The checkpoint folder.
        step: The step recorded in its manifest.
        trainer_state: The ``trainer_state`` dict given to :meth:`CheckpointManager.save`.
        extra: The ``extra_json`` dicts given to save, by name.
        tensors: The ``extra_tensors`` given to save, by name (e.g. gradient-sign buffers).
    """

    path: Path
    step: int
    trainer_state: dict[str, Any]
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable or not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read ``trainer_state.json`` of a checkpoint without loading (or verifying) anything else.

    Args:
        path: The checkpoint folder.

    Returns:
        The trainer state dict that was saved.

    Raises:
        CheckpointError: If the file is missing or not a JSON object.
    """
    return _read_json_object(Path(path) / TRAINER_STATE_FILE)


class CheckpointManager:
    """Saves and loads the checkpoints of one run in ``<run_dir>/checkpoints``.

    Args:
        directory: The checkpoints folder; created on the first save.
        keep_last: How many checkpoints (newest by step) to keep after each save; the one
            ``latest`` points to is never deleted.

    Raises:
        ValueError: If ``keep_last`` is not an int >= 1.

    Example:
        >>> manager = CheckpointManager(run_dir / "checkpoints", keep_last=2)  # doctest: +SKIP
        >>> manager.save(200, model=model, optimizer=opt, trainer_state={"step": 200})
        >>> path, skipped = manager.find_latest_valid()
        >>> loaded = manager.load(path, model=model, optimizer=opt)
    """

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(
        self,
        step: int,
        *,
        model: nn.Module | Mapping[str, torch.Tensor],
        optimizer: Optimizer | None = None,
        trainer_state: Mapping[str, Any],
        extra_json: Mapping[str, Mapping[str, Any]] | None = None,
        extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Write the checkpoint for ``step`` atomically and point ``latest`` at it.

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

        Returns:
            The checkpoint folder.

        Raises:
            ValueError: If ``step``, a name or a JSON payload is invalid (nothing is written).
        """
        final = self.directory / step_dir_name(step)
        step = int(step)  # A numpy integer would not serialize into the manifest.
        if not isinstance(trainer_state, Mapping):
            raise ValueError(f"trainer_state must be a mapping, got {type(trainer_state).__name__}")
        # Serialize every JSON payload up front so a bad value fails before anything is written.
        payloads = {TRAINER_STATE_FILE: encode_json(dict(trainer_state), "trainer_state")}
        for name, obj in (extra_json or {}).items():
            check_extra_name(name)
            if not isinstance(obj, Mapping):
                raise ValueError(
                    f"extra_json[{name!r}] must be a mapping, got {type(obj).__name__}"
                )
            payloads[f"{name}.json"] = encode_json(dict(obj), f"extra_json[{name!r}]")
        tensor_files: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensors in (extra_tensors or {}).items():
            check_extra_name(name)
            if name in ("model",):
                raise ValueError("extra_tensors name 'model' is used by the checkpoint itself")
            tensor_files[f"{name}.safetensors"] = {
                k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

        self.directory.mkdir(parents=True, exist_ok=True)
        self._clean_stale()
        tmp = self.directory / make_temp_name("tmp", final.name)
        with _ACTIVE_LOCK:
            _ACTIVE.add(tmp.name)
        try:
            tmp.mkdir()
            self._write_contents(tmp, step, model, optimizer, payloads, tensor_files)
            self._commit(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(tmp.name)
        replace_symlink(self.directory / LATEST_LINK, final.name)
        self._apply_retention()
        return final

    def _write_contents(
        self,
        tmp: Path,
        step: int,
        model: nn.Module | Mapping[str, torch.Tensor],
        optimizer: Optimizer | None,
        payloads: Mapping[str, bytes],
        tensor_files: Mapping[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        save_model_weights(model, tmp / MODEL_FILE)
        for fname, tensors in (tensor_files or {}).items():
            save_file(tensors, str(tmp / fname))
        if optimizer is not None:
            save_optimizer_state(optimizer.state_dict(), tmp)
        for name, data in payloads.items():
            write_bytes(tmp / name, data)
        for path in tmp.iterdir():
            fsync_file(path)
        # The manifest is written last: a folder with a valid manifest is a complete checkpoint.
        manifest = build_manifest(tmp, step)
        write_bytes(tmp / MANIFEST_FILE, encode_json(manifest, MANIFEST_FILE))
        fsync_dir(tmp)

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
        path = Path(path)
        if path.is_symlink():
            # Report the step folder, not ``latest``, so the caller logs what was really loaded.
            path = path.parent / os.readlink(path)
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {'; '.join(problems)}. Load an earlier one "
                "(CheckpointManager.find_latest_valid finds the newest intact checkpoint)"
            )
        manifest, _ = read_manifest(path)
        if manifest is None:  # Verified just above; only a concurrent writer gets here.
            raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} changed while loading")
        listed = set(manifest["files"])

        model_file = path / MODEL_FILE
        if model is not None:
            if MODEL_FILE not in listed:
                raise CheckpointError(f"checkpoint {path} has no {MODEL_FILE}")
            check_fits(model, read_shapes(model_file), model_file, strict)
        optimizer_state = None
        if optimizer is not None:
            if OPTIMIZER_LAYOUT_FILE not in listed or OPTIMIZER_TENSORS_FILE not in listed:
                raise CheckpointError(
                    f"checkpoint {path} has no optimizer state; load it without optimizer= "
                    "or resume from a checkpoint saved with one"
                )
            optimizer_state = load_optimizer_state(path)
            _check_optimizer_fits(optimizer, optimizer_state, path)

        trainer_state = _read_json_object(path / TRAINER_STATE_FILE)
        extra = {
            name[: -len(".json")]: _read_json_object(path / name)
            for name in sorted(listed - _NOT_EXTRA)
            if name.endswith(".json")
        }
        extra_tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name in sorted(listed - {MODEL_FILE, OPTIMIZER_TENSORS_FILE}):
            if name.endswith(".safetensors"):
                try:
                    extra_tensors[name[: -len(".safetensors")]] = load_file(str(path / name))
                except Exception as exc:  # safetensors raises its own error types
                    raise CheckpointError(f"checkpoint {path}: cannot read {name} ({exc})") from exc
        if model is not None:
            load_into_model(model, model_file)
        if optimizer is not None and optimizer_state is not None:
            try:
                optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(
                    f"checkpoint {path}: optimizer state does not fit the optimizer ({exc})"
                ) from exc
        return LoadedCheckpoint(
            path=path, step=manifest["step"], trainer_state=trainer_state, extra=extra,
            tensors=extra_tensors,
        )


def _check_optimizer_fits(optimizer: Optimizer, state: Mapping[str, Any], path: Path) -> None:
    saved_groups = state.get("param_groups", [])
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise CheckpointError(
            f"checkpoint {path}: {OPTIMIZER_LAYOUT_FILE} has {len(saved_groups)} parameter "
            f"group(s) but the optimizer has {len(groups)}; build the optimizer as the run did"
        )
    for i, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        n_saved = len(saved.get("params", []))
        n_now = len(group["params"])
        if n_saved != n_now:
            raise CheckpointError(
                f"checkpoint {path}: {OPTIMIZER_LAYOUT_FILE} parameter group {i} has {n_saved} "
                f"parameter(s) but the optimizer's has {n_now}; the model or trainable set differs"
            )
