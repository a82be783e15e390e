"""Loading a checkpoint: verify every file against the manifest while the files are parsed, and
change the model and optimizer only once everything has checked out."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim import Optimizer

from gearshift.checkpoint.layout import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_LAYOUT_FILE,
    OPTIMIZER_TENSORS_FILE,
    TRAINER_STATE_FILE,
)
from gearshift.checkpoint.manifest import read_manifest, verify_checkpoint
from gearshift.checkpoint.model_state import (
    check_fits,
    load_into_model,
    load_model_tensors,
    read_shapes,
)
from gearshift.checkpoint.optimizer_state import load_optimizer_state
from gearshift.errors import CheckpointError

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


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file, or CheckpointError naming the file."""
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
    return read_json_object(Path(path) / TRAINER_STATE_FILE)


@dataclass
class _Read:
    manifest: dict[str, Any]
    model_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any] | None
    trainer_state: dict[str, Any]
    extra: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, torch.Tensor]]


def _corrupt(path: Path, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt: {'; '.join(problems)}. Load an earlier one "
        "(CheckpointManager.find_latest_valid finds the newest intact checkpoint)"
    )


def load_checkpoint(path: Path, *, model: nn.Module | None, optimizer: Optimizer | None,
                    strict: bool) -> LoadedCheckpoint:
    """:meth:`CheckpointManager.load`: verify, read, check the fit, then change anything.

    The files are hashed in parallel threads while this thread parses them; nothing read is used
    before every hash has matched the manifest.
    """
    if path.is_symlink():
        # Report the step folder, not ``latest``, so the caller logs what was really loaded.
        path = path.parent / os.readlink(path)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gs-verify") as pool:
        verifying = pool.submit(verify_checkpoint, path)
        try:
            read = _read(path, model, optimizer, strict)
        except CheckpointError:
            problems = verifying.result()
            if problems:
                raise _corrupt(path, problems) from None
            raise
        problems = verifying.result()
    if problems:
        raise _corrupt(path, problems)
    if model is not None:
        load_into_model(model, path / MODEL_FILE, read.model_state)
    if optimizer is not None and read.optimizer_state is not None:
        try:
            optimizer.load_state_dict(read.optimizer_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {path}: optimizer state does not fit the optimizer ({exc})"
            ) from exc
    return LoadedCheckpoint(path=path, step=read.manifest["step"],
                            trainer_state=read.trainer_state, extra=read.extra,
                            tensors=read.tensors)


def _read(path: Path, model: nn.Module | None, optimizer: Optimizer | None,
          strict: bool) -> _Read:
    manifest, problems = read_manifest(path)
    if manifest is None:
        raise _corrupt(path, problems)
    listed = set(manifest["files"])
    model_file = path / MODEL_FILE
    model_state = None
    if model is not None:
        if MODEL_FILE not in listed:
            raise CheckpointError(f"checkpoint {path} has no {MODEL_FILE}")
        check_fits(model, read_shapes(model_file), model_file, strict)
        model_state = load_model_tensors(model_file)
    optimizer_state = None
    if optimizer is not None:
        if OPTIMIZER_LAYOUT_FILE not in listed or OPTIMIZER_TENSORS_FILE not in listed:
            raise CheckpointError(
                f"checkpoint {path} has no optimizer state; load it without optimizer= "
                "or resume from a checkpoint saved with one"
            )
        optimizer_state = load_optimizer_state(path)
        _check_optimizer_fits(optimizer, optimizer_state, path)
    trainer_state = read_json_object(path / TRAINER_STATE_FILE)
    extra = {
        name[: -len(".json")]: read_json_object(path / name)
        for name in sorted(listed - _NOT_EXTRA)
        if name.endswith(".json")
    }
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(listed - {MODEL_FILE, OPTIMIZER_TENSORS_FILE}):
        if name.endswith(".safetensors"):
            try:
                tensors[name[: -len(".safetensors")]] = load_file(str(path / name))
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"checkpoint {path}: cannot read {name} ({exc})") from exc
    return _Read(manifest, model_state, optimizer_state, trainer_state, extra, tensors)


def _check_optimizer_fits(optimizer: Optimizer, state: dict[str, Any], path: Path) -> None:
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
