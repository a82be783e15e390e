"""The phase controller: named training phases that follow the loss.

A :class:`PhaseScheduler` watches the loss (and optionally the gradient-sign stability) once per
optimizer step and moves the run to the next phase — typically a higher LoRA alpha, possibly a
different LR scale — when the current phase has stopped improving meaningfully and is not
failing (:mod:`gearshift.phases.rules`). Two config schemas are accepted
(:mod:`gearshift.phases.schema`): gearshift's own, scale-invariant one and the ``alpha_schedule``
block of existing LoRA trainers.

Example:
    >>> from gearshift.phases import build_phase_scheduler
    >>> sched = build_phase_scheduler(
    ...     {"window": 20, "patience": 2,
    ...      "phases": [{"name": "foundation", "alpha": 8, "min_steps": 0},
    ...                 {"name": "emphasis", "alpha": 16}]}, rank=8)
    >>> moved = [sched.update(step, loss=2.0) for step in range(30)]
    >>> moved.index(True), sched.current_phase.name, sched.get_scale("layers.0.q_proj", None)
    (20, 'emphasis', 2.0)
"""

from gearshift.phases.rules import Evidence
from gearshift.phases.scheduler import PhaseScheduler, build_phase_scheduler
from gearshift.phases.schema import (
    ExitCriteria,
    LoraTrainerPhasesConfig,
    PhaseConfig,
    PhasesConfig,
)
from gearshift.phases.spec import ControllerSpec, ExitSpec, Phase, build_spec
from gearshift.phases.state import STATE_VERSION
from gearshift.phases.stats import PhaseTrend, RollingFit, RollingMean, t_quantile
from gearshift.phases.validate import parse_phases_config, validate_phases_config

__all__ = [
    "STATE_VERSION",
    "ControllerSpec",
    "Evidence",
    "ExitCriteria",
    "ExitSpec",
    "LoraTrainerPhasesConfig",
    "Phase",
    "PhaseConfig",
    "PhaseScheduler",
    "PhaseTrend",
    "PhasesConfig",
    "RollingFit",
    "RollingMean",
    "build_phase_scheduler",
    "build_spec",
    "parse_phases_config",
    "t_quantile",
    "validate_phases_config",
]
