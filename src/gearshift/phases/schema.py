"""The two accepted ``phases:`` config schemas (pydantic v2, unknown keys forbidden).

**gearshift's own schema** (:class:`PhasesConfig`), selected by a ``phases:`` list::

    phases:
      window: 300            # statistics window, optimizer steps
      alpha: 16              # alpha of every phase / group that sets none
      groups: {patterns: {attn: "self_attn"}}          # module-name regex -> LoRA group
      experts: {patterns: {high_noise: "high_noise"}}  # module-name regex -> MoE expert
      phases:
        - name: foundation
          alpha: {linear: 16, conv: 8}
          exit: {relative_improvement_below: 0.0002}
        - {name: balance, alpha: 12, expert_alpha: {high_noise: 14}, lr_scale: 0.5}

**LoRA-trainer schema** (:class:`LoraTrainerPhasesConfig`), selected by ``conv_alpha_phases``,
``linear_alpha``, ``conv_alpha``, ``per_expert``, ``mode`` or ``_preset``: the
``alpha_schedule`` block that existing LoRA trainers use, with their defaults, accepted exactly
as their default-config writer and job UI write it. ``mode`` and ``_preset`` are accepted and
not used (a value other than ``phase_adaptive`` / ``video`` / ``image`` is warned about once).
Keys they do not have (``max_steps``, ``lr_scale``, ``require_r2``, ``max_cv``, ``window``,
``patience``, ``confidence``, ``use_rslora``, an expert's ``pattern``) are accepted as gearshift
extensions.

Defaults, gearshift schema (each is the ``Field`` default below):

- ``enabled: true`` — a ``phases:`` section means phases are wanted (both schemas).
- ``window: 300`` optimizer steps: no transition before a full window. When the window is too
  short for the noise to tell a plateau from a fall of ``τ`` per step, the rate is judged over
  2 and 4 windows, then over the whole phase (:mod:`gearshift.phases.rules`): a flat loss with
  per-step CV ``c`` needs about ``(12 · (1.65 · c / (1.5 · τ))²)^(1/3)`` losses — 320 for
  ``c = 0.3``, 710 for ``c = 1`` at the default ``τ``.
- ``patience: 10`` consecutive passing checks; ``confidence: 0.95`` (one-sided) for the window
  tests, 0.999 for the whole-phase rising test.
- ``alpha: 16`` for phases and groups that set none; ``use_rslora: false``; no groups, no
  experts.
- per phase: ``min_steps: 50``, ``max_steps: null`` (never forced), ``alpha: null`` (the
  top-level alpha), ``expert_alpha: {}``, ``lr_scale: 1.0``, ``quant_lambda: null`` (the
  quantization ramp decides λ; with a ``quantization`` section only).
- ``exit``: ``relative_improvement_below: 0.0002`` (0.02% of the mean loss per step),
  ``min_gradient_stability: null`` (not checked), ``max_cv: 0.5`` (on the level, not on each
  step), ``min_r2: null`` (not reported), ``require_r2: false`` (R² advisory).

LoRA-trainer schema defaults are theirs: ``linear_alpha: 16``, ``min_steps: 500``,
``loss_improvement_rate_below: 0.001`` (absolute loss change per step),
``min_gradient_stability: 0.55`` (checked only once stability values are given),
``min_loss_r2: 0.1`` (advisory), ``window: 100`` (the losses those trainers require before
their first transition) — plus the gearshift defaults for the extensions. Per-expert
``min_steps`` / ``exit_criteria`` are accepted but unused, with a warning: one decision is made
for the whole model, experts differ only in alpha.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExitCriteria(_Strict):
    """When a phase (gearshift schema) has done its job; see :mod:`gearshift.phases.rules`."""

    relative_improvement_below: float = Field(
        0.0002, gt=0, allow_inf_nan=False,
        description="plateau threshold: improvement per step as a fraction of the mean loss "
        "(0.0002 = the phase ends once there is no evidence that the loss still falls by "
        "0.02%/step, i.e. 2% per 100 steps)")
    min_gradient_stability: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="minimum mean gradient-sign agreement over the window; null = not checked "
        "(checked only once stability values have been given)")
    max_cv: float | None = Field(
        0.5, gt=0, allow_inf_nan=False,
        description="maximum spread of the loss level: standard deviation of the means of 10 "
        "consecutive blocks of the window over their mean (per-step noise barely moves it); "
        "null = no cap")
    min_r2: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="R² of the window's linear fit to report against; null = not reported")
    require_r2: bool = Field(False, description="make min_r2 blocking (otherwise advisory)")


class PhaseConfig(_Strict):
    """One phase of the gearshift schema."""

    name: str = Field(min_length=1, description="unique phase name")
    min_steps: int = Field(50, ge=0, description="optimizer steps before any transition")
    max_steps: int | None = Field(
        None, ge=1, description="steps after which the next phase starts regardless of the "
        "criteria (reason 'max_steps'); null = never forced. Ignored on the last phase")
    alpha: Any = Field(None, description="LoRA alpha: a number or {group: alpha}; null = the "
                       "top-level alpha")
    expert_alpha: dict[str, Any] = Field(
        default_factory=dict, description="{expert: alpha or {group: alpha}} for MoE experts")
    lr_scale: float = Field(1.0, gt=0, allow_inf_nan=False,
                            description="multiplier of the learning rate during this phase")
    quant_lambda: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="quantization strength λ during this phase (with a quantization section); "
        "null = the quantization ramp decides")
    exit: ExitCriteria = Field(default_factory=ExitCriteria)


class PatternSet(_Strict):
    """Names matched by module-name regular expressions (``re.search``, first match wins)."""

    patterns: dict[str, str] = Field(default_factory=dict)


class _Common(_Strict):
    enabled: bool = Field(True, description="false = no controller, the run behaves as without")
    window: int = Field(200, ge=3, description="statistics window in optimizer steps (samples "
                        "of the current phase only); noisier losses need longer windows")
    patience: int = Field(10, ge=1, description="consecutive passing checks required before a "
                          "plateau transition")
    confidence: float = Field(0.95, gt=0.5, lt=1, allow_inf_nan=False,
                              description="one-sided confidence of every statistical test")
    use_rslora: bool = Field(False, description="scale = alpha/sqrt(rank) instead of alpha/rank")


class PhasesConfig(_Common):
    """gearshift's own phases schema (see the module docstring)."""

    window: int = Field(300, ge=3, description="statistics window in optimizer steps (samples "
                        "of the current phase only); a noisier loss is judged over 2, 4 "
                        "windows or the whole phase when one window is too short for it")

    alpha: float = Field(16.0, ge=0, allow_inf_nan=False,
                         description="alpha wherever a phase or group sets none")
    groups: PatternSet = Field(default_factory=PatternSet,
                               description="user-defined LoRA groups by module-name regex")
    experts: PatternSet = Field(default_factory=PatternSet,
                                description="mixture-of-experts experts by module-name regex")
    phases: list[PhaseConfig] = Field(default_factory=list)


class LoraExitCriteria(_Strict):
    """``exit_criteria`` of a LoRA-trainer phase (their defaults)."""

    loss_improvement_rate_below: float = Field(
        0.001, gt=0, allow_inf_nan=False,
        description="plateau threshold as an absolute loss change per step")
    min_gradient_stability: float | None = Field(0.55, ge=0, le=1, allow_inf_nan=False)
    min_loss_r2: float | None = Field(0.1, ge=0, le=1, allow_inf_nan=False,
                                      description="advisory unless require_r2")
    require_r2: bool = False
    max_cv: float | None = Field(0.5, gt=0, allow_inf_nan=False)


class LoraPhase(_Strict):
    """One entry of ``conv_alpha_phases``."""

    alpha: float = Field(ge=0, allow_inf_nan=False, description="conv LoRA alpha in this phase")
    min_steps: int = Field(500, ge=0)
    max_steps: int | None = Field(None, ge=1)
    lr_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    exit_criteria: LoraExitCriteria = Field(default_factory=LoraExitCriteria)


class LoraExpertPhase(_Strict):
    """One phase of one expert: only ``alpha`` is used (decisions are global)."""

    alpha: float = Field(ge=0, allow_inf_nan=False)
    min_steps: int | None = Field(None, ge=0, description="accepted, unused (global decisions)")
    exit_criteria: dict[str, Any] | None = Field(None, description="accepted, unused")


class LoraExpert(_Strict):
    """``per_expert.<EXPERT>``."""

    phases: dict[str, LoraExpertPhase] = Field(default_factory=dict)
    pattern: str | None = Field(None, description="module-name regex; default: the expert's "
                                "name anywhere in the module name, case-insensitive")


class LoraTrainerPhasesConfig(_Common):
    """The LoRA-trainer ``alpha_schedule`` schema (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    window: int = Field(100, ge=3, description="statistics window in optimizer steps; 100 = "
                        "the losses those trainers require before their first transition")
    mode: str | None = Field(None, description="written by those trainers' default-config "
                             "writer ('phase_adaptive', the only mode there is); not used")
    preset: str | None = Field(None, alias="_preset", description="written by those trainers' "
                               "job UI ('video' or 'image'; the values it stands for are "
                               "written out beside it); not used")

    linear_alpha: float = Field(16.0, ge=0, allow_inf_nan=False,
                                description="alpha of every linear LoRA layer, all phases")
    conv_alpha: float | None = Field(None, ge=0, allow_inf_nan=False,
                                     description="accepted for compatibility; phases set conv")
    conv_alpha_phases: dict[str, LoraPhase] = Field(default_factory=dict)
    per_expert: dict[str, LoraExpert] = Field(default_factory=dict)


LORA_KEYS: frozenset[str] = frozenset({"linear_alpha", "conv_alpha", "conv_alpha_phases",
                                       "per_expert", "mode", "_preset"})
#: Values of the LoRA-trainer keys that gearshift accepts silently; any other is warned about.
LORA_KNOWN_VALUES: dict[str, frozenset[str]] = {
    "mode": frozenset({"phase_adaptive"}), "_preset": frozenset({"video", "image"})}
SchemaModel = PhasesConfig | LoraTrainerPhasesConfig
