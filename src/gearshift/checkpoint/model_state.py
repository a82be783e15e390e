"""Model weights in ``model.safetensors``: read, check against a module, load with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from gearshift.checkpoint.layout import MODEL_FILE
from gearshift.errors import CheckpointError

_MAX_LISTED = 8


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def load_model_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint without a model (for adapters and inspection).

    This does not check the manifest; use :func:`verify_checkpoint` first when that matters.

    Args:
        path: A checkpoint folder, or a ``.safetensors`` file.

    Returns:
        Tensor name to CPU tensor, as stored (tied weights appear once).

    Raises:
        CheckpointError: If the file is missing or cannot be parsed.
    """
    file = _model_file(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; no model weights in this checkpoint")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error type for every parse failure
        raise CheckpointError(f"{file}: cannot be parsed as safetensors ({exc})") from exc


def read_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Return tensor name to shape from a safetensors header, without reading the data.

    Raises:
        CheckpointError: If the header cannot be parsed or does not fit the file.
    """
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for every parse failure
        raise CheckpointError(f"{file}: cannot be parsed as safetensors ({exc})") from exc


def _alias_groups(state: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Group state-dict names that are views of the same memory (tied weights)."""
    groups: dict[tuple[object, ...], set[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
        )
        groups.setdefault(key, set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def check_fits(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], file: Path, strict: bool
) -> None:
    """Raise CheckpointError if the stored tensors do not fit ``model``.

    Shapes must always match. With ``strict``, every model tensor must be stored (one name of a
    tied pair suffices) and every stored tensor must belong to the model.
    """
    expected = model.state_dict()
    mismatched = [
        f"{name} (model {tuple(expected[name].shape)}, checkpoint {shape})"
        for name, shape in shapes.items()
        if name in expected and tuple(expected[name].shape) != shape
    ]
    problems: list[str] = []
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if strict:
        covered = set(shapes)
        for group in _alias_groups(expected):
            if group & covered:
                covered |= group
        missing = sorted(set(expected) - covered)
        unexpected = sorted(set(shapes) - set(expected))
        if missing:
            problems.append(f"missing from checkpoint: {_listing(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_listing(unexpected)}")
    if problems:
        hint = (
            "" if mismatched else " (pass strict=False to load a partial state such as an adapter)"
        )
        raise CheckpointError(
            f"{file} does not fit {type(model).__name__}: {'; '.join(problems)}{hint}"
        )


def load_into_model(model: nn.Module, file: Path,
                    state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Copy the stored tensors (``state`` when already read from ``file``) into ``model``, after
    :func:`check_fits`.

    ``safetensors.torch.load_model`` is not used here because it rejects a file that holds both
    names of a tied pair (as written from a plain state-dict mapping); ``load_state_dict`` copies
    each stored tensor into its parameter, and tied names share that parameter.
    """
    if state is None:
        state = load_model_tensors(file)
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{file}: cannot be loaded into {type(model).__name__} ({exc})"
        ) from exc


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown
