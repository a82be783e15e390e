"""Checking and decoding a saved controller state (:meth:`PhaseScheduler.load_state_dict`).

Version 1 layout (every value JSON-safe; floats finite, ``inf`` written as ``"inf"``)::

    version, schema, phase_names, phase_index, steps_in_phase, total_steps, last_step,
    streak, ignored_losses, transition_history, window, long_windows, level, trend,
    stability, experts, last_decision, last_decision_phase, evidence, outcome

(``long_windows`` and ``level`` came later; a state without them is read with a warning and
starts them empty.)

Which side wins on resume: the config for thresholds, alphas and the window length (a changed
window keeps the newest samples, with a warning); the checkpoint for every counter and buffer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gearshift.errors import CheckpointError
from gearshift.phases.level import LevelBlocks
from gearshift.phases.rules import Check, Evidence
from gearshift.phases.stats import PhaseTrend, RollingFit, RollingMean

if TYPE_CHECKING:
    from gearshift.phases.spec import ControllerSpec

STATE_VERSION = 1
#: Lengths of the longer windows, in statistics windows (judged when one is too short).
LONG_WINDOWS = (2, 4, 8)


def decode_state(state: Any, defaults: dict[str, Any], spec: ControllerSpec) -> dict[str, Any]:
    """Validate ``state`` against ``spec`` and decode it; raise before anything is changed.

    Args:
        state: What :meth:`PhaseScheduler.state_dict` returned (possibly through JSON / torch).
        defaults: A fresh controller's state, used for keys an older state lacks.
        spec: The controller's config.

    Returns:
        The decoded fields, with statistics objects rebuilt.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"phase state must be a dict, got {type(state).__name__}")
    version = state.get("version")
    if version is not None and version != STATE_VERSION:
        raise CheckpointError(
            f"phase state version {version!r} is not supported (this gearshift reads "
            f"{STATE_VERSION}); resume with the gearshift version that wrote the checkpoint")
    missing = [k for k in defaults if k not in state]
    if missing:
        warnings.warn(
            f"phase state lacks {', '.join(missing)} (written by an older gearshift?); using "
            "fresh-start values for them", UserWarning, stacklevel=3)
    unknown = sorted(str(k) for k in state if k not in defaults)
    if unknown:
        warnings.warn(f"phase state has unknown keys {', '.join(unknown)}; ignored",
                      UserWarning, stacklevel=3)
    s = {**defaults, **{k: state[k] for k in defaults if k in state}}
    names = s["phase_names"]
    if not isinstance(names, (list, tuple)) or list(names) != spec.phase_names:
        raise CheckpointError(
            f"the checkpoint's phases {list(names) if isinstance(names, (list, tuple)) else names!r}"
            f" do not match the config's phases {spec.phase_names}; resume with the config the "
            "run was started with, or start the phases afresh without the checkpoint's phase "
            "state")
    out: dict[str, Any] = {}
    for key in ("phase_index", "steps_in_phase", "total_steps", "streak", "ignored_losses"):
        out[key] = _count(s[key], key)
    if out["phase_index"] >= len(spec.phases):
        raise CheckpointError(f"phase state phase_index {out['phase_index']} is out of range "
                              f"for {len(spec.phases)} phases")
    last = s["last_step"]
    out["last_step"] = None if last is None else _count(last, "last_step")
    history = s["transition_history"]
    if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
        raise CheckpointError("phase state transition_history must be a list of dicts")
    out["transition_history"] = [plain(h) for h in history]
    window, resized = RollingFit.from_state(s["window"], spec.window, "window")
    if resized:
        warnings.warn(
            f"phase statistics window changed to {spec.window} since the checkpoint; kept the "
            "newest samples and recomputed the sums (decisions may differ from an uninterrupted "
            "run)", UserWarning, stacklevel=3)
    out["window"] = window
    longs = s["long_windows"]
    if not isinstance(longs, list) or len(longs) != len(LONG_WINDOWS):
        raise CheckpointError(f"phase state long_windows must be a list of {len(LONG_WINDOWS)} "
                              "windows")
    out["long_windows"] = tuple(
        RollingFit.from_state(body, k * spec.window, f"long_windows.{i}")[0]
        for i, (k, body) in enumerate(zip(LONG_WINDOWS, longs, strict=True)))
    out["level"] = LevelBlocks.from_state(s["level"], spec.window, "level")
    out["trend"] = PhaseTrend.from_state(s["trend"], "trend")
    out["stability"] = RollingMean.from_state(s["stability"], spec.window, "stability")
    experts = s["experts"]
    if not isinstance(experts, Mapping):
        raise CheckpointError("phase state experts must be a dict")
    out["experts"] = {}
    for name, body in experts.items():
        if not isinstance(body, Mapping):
            raise CheckpointError(f"phase state experts.{name} must be a dict")
        fit, _ = RollingFit.from_state(body.get("window"), spec.window, f"experts.{name}.window")
        mean = RollingMean.from_state(body.get("stability"), spec.window,
                                      f"experts.{name}.stability")
        out["experts"][str(name)] = (fit, mean)
    out["last_decision"] = _checks(s["last_decision"])
    out["evidence"] = _evidence(s["evidence"])
    outcome = s["outcome"]
    out["outcome"] = outcome if isinstance(outcome, str) else str(outcome)
    decided = s["last_decision_phase"]
    out["last_decision_phase"] = decided if decided is None else str(decided)
    return out


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"phase state {key} must be an integer >= 0, got {value!r}")
    return value


def plain(value: Any) -> Any:
    """A deep copy of nested mappings / sequences as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _checks(value: Any) -> tuple[Check, ...]:
    if not isinstance(value, list):
        raise CheckpointError("phase state last_decision must be a list")
    try:
        return tuple((str(c["criterion"]), c["value"], c["threshold"], str(c["result"]),
                      bool(c.get("required", True))) for c in value)
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"phase state last_decision is malformed: {exc!r}") from None


def _evidence(value: Any) -> Evidence:
    if not isinstance(value, Mapping):
        raise CheckpointError("phase state evidence must be a dict")
    known = Evidence.__dataclass_fields__
    return Evidence(**{k: v for k, v in value.items() if k in known})
