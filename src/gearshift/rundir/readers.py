"""Typed readers of a run directory: config, overrides, metrics, events, checkpoints, final model.

Everything that reads a finished or running run (report, compare, pipeline, daemon, the CLI)
reads through these functions, never by building paths by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gearshift.checkpoint.layout import parse_step_dir
from gearshift.checkpoint.manager import CheckpointManager
from gearshift.config import Config, read_config_file, validate
from gearshift.errors import RunDirError
from gearshift.rundir.jsonl import decode_value, iter_records
from gearshift.rundir.layout import RunPaths

Value = float | int | str | bool | None | list[Any] | dict[str, Any]


@dataclass(frozen=True)
class MetricRecord:
    """One line of ``metrics.jsonl``: the step and the values logged at it.

    ``"nan"``/``"inf"``/``"-inf"`` (how JSON stores non-finite floats) are floats again.
    """

    step: int
    values: dict[str, Value] = field(default_factory=dict)

    def number(self, name: str) -> float | None:
        """The value of ``name`` as a float, or None when it is absent or not a number."""
        value = self.values.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)


@dataclass(frozen=True)
class EventRecord:
    """One line of ``events.jsonl``: what happened (``kind``), at which step, and its details."""

    step: int
    kind: str
    time: float | None = None
    fields: dict[str, Value] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointEntry:
    """A ``checkpoints/step-XXXXXXXX`` folder (not verified: see ``checkpoint verify``)."""

    step: int
    path: Path


def read_run_config_dict(run_dir: str | Path) -> dict[str, Any]:
    """The values of ``config.yaml`` as saved, to layer overrides on before validating.

    Raises:
        RunDirError: When ``config.yaml`` is missing or empty.
        ConfigError: When it is not a YAML mapping.
    """
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise RunDirError(f"{paths.root} has no config.yaml; is it a gearshift run directory?")
    saved = read_config_file(paths.config)
    if not saved:
        raise RunDirError(f"{paths.config} is empty; restore it (it is the run's resolved "
                          f"config) or resume with `gearshift train CONFIG --resume "
                          f"{paths.root}`")
    return saved


def read_run_config(run_dir: str | Path) -> Config:
    """The validated config a run was started (or last resumed) with.

    Raises:
        RunDirError: When ``config.yaml`` is missing or empty.
        ConfigError: When it does not validate, listing every problem.
    """
    paths = RunPaths(run_dir)
    return validate(read_run_config_dict(run_dir), source=str(paths.config))


def read_overrides(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``overrides.json``: per dotted config key, the value and the layer that set it.

    Returns:
        ``{}`` when the file is missing (a run started through the Python API with no audit).

    Raises:
        RunDirError: When the file is not a JSON object.
    """
    path = RunPaths(run_dir).overrides
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is not a JSON object")
    return data


def read_metrics(run_dir: str | Path) -> list[MetricRecord]:
    """Every line of ``metrics.jsonl`` in file order (a missing file: ``[]``).

    A torn last line (a killed run) is skipped.

    Raises:
        RunDirError: For a corrupt line before the last, naming ``file:line``.
    """
    return [MetricRecord(r["step"], {k: decode_value(v) for k, v in r.items() if k != "step"})
            for _, r in iter_records(RunPaths(run_dir).metrics)]


def metric_series(records: list[MetricRecord], name: str) -> list[tuple[int, float]]:
    """``(step, value)`` for every record that logged ``name`` as a finite or non-finite number.

    Example:
        >>> metric_series([MetricRecord(1, {"loss": 2.0}), MetricRecord(2, {"lr": 0.1})], "loss")
        [(1, 2.0)]
    """
    return [(r.step, v) for r in records if (v := r.number(name)) is not None]


def read_events(run_dir: str | Path, kind: str | None = None) -> list[EventRecord]:
    """Every line of ``events.jsonl`` in file order, or only those of ``kind``.

    A torn last line (a killed run) is skipped.

    Raises:
        RunDirError: For a corrupt line before the last or one without an ``event`` name,
            naming ``file:line``.
    """
    path = RunPaths(run_dir).events
    events = []
    for number, r in iter_records(path):
        name = r.get("event")
        if not isinstance(name, str):
            raise RunDirError(f"{path}:{number}: no 'event' name; the file is corrupt: fix or "
                              "delete that line")
        when = r.get("time")
        event = EventRecord(
            step=r["step"], kind=name,
            time=float(when) if isinstance(when, int | float) and math.isfinite(when) else None,
            fields={k: decode_value(v) for k, v in r.items() if k not in ("step", "event", "time")})
        if kind is None or event.kind == kind:
            events.append(event)
    return events


def list_checkpoints(run_dir: str | Path) -> list[CheckpointEntry]:
    """The run's ``step-XXXXXXXX`` checkpoint folders, oldest step first (``[]`` if none)."""
    manager = CheckpointManager(RunPaths(run_dir).checkpoints)
    return [CheckpointEntry(_step_of(p), p) for p in manager.list_checkpoints()]


def latest_checkpoint(run_dir: str | Path) -> CheckpointEntry | None:
    """The checkpoint ``latest`` points to, else the highest step, else None.

    The link is missing only when a run was killed between renaming a checkpoint into place
    and moving the link; the highest step is then the newest complete save.
    """
    target = CheckpointManager(RunPaths(run_dir).checkpoints).latest()
    if target is not None and parse_step_dir(target.name) is not None:
        return CheckpointEntry(_step_of(target), target)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def final_model_dir(run_dir: str | Path) -> Path | None:
    """``final/`` when the run has exported its model or adapter, else None.

    The export is renamed into place only when complete, so an existing ``final/`` is whole.
    """
    path = RunPaths(run_dir).final
    return path if path.is_dir() else None


def _step_of(path: Path) -> int:
    step = parse_step_dir(path.name)
    if step is None:  # list_checkpoints returns only step-* folders
        raise RunDirError(f"{path} is not a step-XXXXXXXX checkpoint folder")
    return step
