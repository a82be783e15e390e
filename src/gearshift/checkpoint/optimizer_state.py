"""Optimizer state as safetensors + JSON, with no pickle, rebuilt bit-exactly.

``optimizer.state_dict()`` is split in two files:

- ``optimizer.safetensors`` holds every tensor, e.g. ``state.3.exp_avg`` for the ``exp_avg`` of
  parameter index 3 (AdamW's ``step`` is a tensor too);
- ``optimizer.json`` holds everything else and says where each tensor goes::

    {"format": "gearshift-optimizer", "version": 1,
     "state": [{"param": 3, "entries": [["step", {"__tensor__": "state.3.step"}], ...]}],
     "param_groups": [{"lr": 0.001, "betas": {"__tuple__": [0.9, 0.999]}, ..., "params": [0, 1]}]}

Plain JSON would turn tuples into lists and cannot hold NaN or infinity, so those are tagged
(``{"__tuple__": [...]}``, ``{"__float__": "nan"}``) and turned back on load.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gearshift.checkpoint.atomic import encode_json, write_bytes
from gearshift.checkpoint.layout import OPTIMIZER_LAYOUT_FILE, OPTIMIZER_TENSORS_FILE
from gearshift.errors import CheckpointError

LAYOUT_FORMAT = "gearshift-optimizer"
LAYOUT_VERSION = 1

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"
_DICT = "__dict__"
_TAGS = frozenset({_TENSOR, _TUPLE, _FLOAT, _DICT})
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class _Encoder:
    """Turns nested optimizer values into JSON, collecting tensors under unique keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {_TENSOR: self._add_tensor(value, key)}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            return {_FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if isinstance(value, tuple):
            return {_TUPLE: [self.encode(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            plain = all(isinstance(k, str) for k in value) and not (_TAGS & set(value))
            if plain:
                return {k: self.encode(v, f"{key}.{k}") for k, v in value.items()}
            return {
                _DICT: [
                    [self.encode(k, f"{key}.key{i}"), self.encode(v, f"{key}.{i}")]
                    for i, (k, v) in enumerate(value.items())
                ]
            }
        raise CheckpointError(
            f"cannot store optimizer state value {key} of type {type(value).__name__}; only "
            "tensors, numbers, str, bool, None, lists, tuples and dicts can be saved without pickle"
        )

    def _add_tensor(self, tensor: torch.Tensor, key: str) -> str:
        unique, n = key, 1
        while unique in self.tensors:
            unique, n = f"{key}~{n}", n + 1
        # The live tensor: the caller copies it (a snapshot, or a private copy for save_file).
        self.tensors[unique] = tensor.detach()
        return unique


class _Decoder:
    """Inverse of :class:`_Encoder`, checking that every tensor is referenced exactly once."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        self.tensors = tensors
        self.used: set[str] = set()
        self.where = where

    def decode(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1 and _TAGS & set(value):
            ((tag, payload),) = value.items()
            if tag == _TENSOR:
                return self._tensor(payload)
            if tag == _TUPLE:
                return tuple(self.decode(v) for v in payload)
            if tag == _FLOAT and payload in _NON_FINITE:
                return _NON_FINITE[payload]
            if tag == _DICT:
                return {self.decode(k): self.decode(v) for k, v in payload}
            raise CheckpointError(f"{self.where}: malformed tagged value {value!r}")
        return {k: self.decode(v) for k, v in value.items()}

    def _tensor(self, key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise CheckpointError(
                f"{self.where.parent / OPTIMIZER_TENSORS_FILE}: tensor {key!r} named in "
                f"{OPTIMIZER_LAYOUT_FILE} is missing"
            )
        self.used.add(key)
        return self.tensors[key]


def encode_optimizer_state(
    optimizer_state_dict: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], bytes]:
    """Split an optimizer state dict into its tensors and the JSON bytes of ``optimizer.json``.

    Args:
        optimizer_state_dict: The result of ``optimizer.state_dict()``.

    Returns:
        ``(tensors, layout)``: the tensors by key (the live tensors, not copies) and the layout.

    Raises:
        CheckpointError: If the state holds a value that cannot be stored without pickle.
    """
    encoder = _Encoder()
    state = optimizer_state_dict.get("state", {})
    entries = []
    for param, param_state in state.items():
        if isinstance(param, bool) or not isinstance(param, (int, str)):
            raise CheckpointError(
                f"optimizer state key {param!r} is not a parameter index (int or str)"
            )
        if not isinstance(param_state, Mapping):
            raise CheckpointError(f"optimizer state for parameter {param!r} is not a dict")
        entries.append(
            {
                "param": param,
                "entries": [
                    [name, encoder.encode(v, f"state.{param}.{name}")]
                    for name, v in param_state.items()
                ],
            }
        )
    groups = [
        encoder.encode(dict(group), f"param_groups.{i}")
        for i, group in enumerate(optimizer_state_dict.get("param_groups", []))
    ]
    other = {k: v for k, v in optimizer_state_dict.items() if k not in ("state", "param_groups")}
    layout = {
        "format": LAYOUT_FORMAT,
        "version": LAYOUT_VERSION,
        "state": entries,
        "param_groups": groups,
        "other": encoder.encode(other, "other"),
    }
    return encoder.tensors, encode_json(layout, OPTIMIZER_LAYOUT_FILE)


def save_optimizer_state(
    optimizer_state_dict: Mapping[str, Any], directory: str | Path
) -> list[Path]:
    """Write an optimizer state dict as ``optimizer.safetensors`` + ``optimizer.json``.

    Args:
        optimizer_state_dict: The result of ``optimizer.state_dict()`` (``state`` and
            ``param_groups``; other top-level keys are kept too).
        directory: An existing folder; the two files must not exist in it yet.

    Returns:
        The paths of the two files written.

    Raises:
        CheckpointError: If the state holds a value that cannot be stored without pickle.

    Example:
        >>> save_optimizer_state(opt.state_dict(), tmp_dir)  # doctest: +SKIP
    """
    directory = Path(directory)
    tensors, layout = encode_optimizer_state(optimizer_state_dict)
    tensors_path = directory / OPTIMIZER_TENSORS_FILE
    layout_path = directory / OPTIMIZER_LAYOUT_FILE
    # safetensors refuses shared or strided storage; private contiguous copies avoid both.
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(tensors_path))
    write_bytes(layout_path, layout)
    return [tensors_path, layout_path]


def load_optimizer_state(directory: str | Path) -> dict[str, Any]:
    """Rebuild the optimizer state dict written by :func:`save_optimizer_state`.

    Args:
        directory: The folder holding ``optimizer.safetensors`` and ``optimizer.json``.

    Returns:
        A dict equal to the saved one: same keys, int parameter indices, tuples, tensors with
        identical bits; ready for ``optimizer.load_state_dict``.

    Raises:
        CheckpointError: If a file is missing, unparseable or the two files disagree.
    """
    directory = Path(directory)
    layout_path = directory / OPTIMIZER_LAYOUT_FILE
    tensors_path = directory / OPTIMIZER_TENSORS_FILE
    for path in (layout_path, tensors_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint has no optimizer state")
    try:
        layout = json.loads(layout_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{layout_path}: not valid JSON ({exc})") from exc
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT:
        raise CheckpointError(f"{layout_path}: not a gearshift optimizer layout")
    if layout.get("version") != LAYOUT_VERSION:
        raise CheckpointError(
            f"{layout_path}: layout version {layout.get('version')!r} is not supported "
            f"(this gearshift reads version {LAYOUT_VERSION})"
        )
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises its own error type for every parse failure
        raise CheckpointError(f"{tensors_path}: cannot be parsed as safetensors ({exc})") from exc
    decoder = _Decoder(tensors, layout_path)
    try:
        state = {
            item["param"]: {name: decoder.decode(v) for name, v in item["entries"]}
            for item in layout["state"]
        }
        groups = [decoder.decode(g) for g in layout["param_groups"]]
        other = decoder.decode(layout.get("other", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{layout_path}: malformed optimizer layout ({exc!r})") from exc
    unused = sorted(set(tensors) - decoder.used)
    if unused:
        raise CheckpointError(
            f"{tensors_path}: holds tensors not named in {OPTIMIZER_LAYOUT_FILE}: {', '.join(unused[:5])}"
        )
    return {"state": state, "param_groups": groups, **other}
