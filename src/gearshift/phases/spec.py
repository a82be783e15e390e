"""One normalised form of either config schema, and how a module's alpha is resolved.

Both schemas become a :class:`ControllerSpec`. The LoRA-trainer schema maps onto it exactly:
every phase's alpha is ``{"linear": linear_alpha, "conv": <phase alpha>}`` (linear layers keep
``linear_alpha``, conv layers follow the phases), ``per_expert`` becomes each phase's
``expert_alpha``, and its absolute ``loss_improvement_rate_below`` keeps ``relative=False``.

Alpha of a module in a phase (:meth:`ControllerSpec.alpha`): the module's *group* is the first
user group whose regex matches the module name, else its layer type (``"conv"`` or ``"linear"``);
its *expert* is the one passed, else the first expert whose regex matches. The expert's entry in
``expert_alpha`` is looked at first, then the phase's ``alpha``; a number applies to every
module, a mapping is looked up by group, then by layer type; when nothing matches, the top-level
``alpha`` applies.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gearshift.phases.schema import (
    LORA_KNOWN_VALUES,
    LoraTrainerPhasesConfig,
    PhasesConfig,
    SchemaModel,
)

AlphaSpec = float | dict[str, float] | None


@dataclass(frozen=True)
class ExitSpec:
    """The exit criteria of one phase, in one form for both schemas.

    Attributes:
        threshold: Plateau threshold on the improvement rate per step.
        relative: True: the rate is a fraction of the window's mean loss (gearshift schema,
            scale-invariant); False: an absolute loss change per step (LoRA-trainer schema).
        min_gradient_stability: Minimum mean gradient-sign agreement, or ``None``.
        max_cv: Cap on the window's coefficient of variation, or ``None``.
        min_r2: R² reported against this, or ``None``.
        require_r2: Whether ``min_r2`` blocks a transition.
    """

    threshold: float
    relative: bool = True
    min_gradient_stability: float | None = None
    max_cv: float | None = 0.5
    min_r2: float | None = None
    require_r2: bool = False


@dataclass(frozen=True)
class Phase:
    """One phase: its name, step limits, alphas, LR scale and exit criteria.

    ``alpha`` is a number (every module) or ``{group: alpha}``; ``display_alpha`` is what
    transitions and :meth:`PhaseScheduler.status` report (for the LoRA-trainer schema the conv
    alpha, as those trainers report it).
    """

    name: str
    min_steps: int
    max_steps: int | None
    alpha: float | dict[str, float]
    expert_alpha: dict[str, AlphaSpec]
    lr_scale: float
    exit: ExitSpec
    display_alpha: float | dict[str, float]
    #: Quantization strength λ in this phase (None: the quantization ramp decides).
    quant_lambda: float | None = None


@dataclass(frozen=True)
class ControllerSpec:
    """Everything the controller needs from the config, whichever schema it came in."""

    schema: str
    phases: tuple[Phase, ...]
    window: int = 200
    patience: int = 10
    confidence: float = 0.95
    use_rslora: bool = False
    default_alpha: float = 16.0
    groups: tuple[tuple[str, re.Pattern[str]], ...] = ()
    experts: tuple[tuple[str, re.Pattern[str]], ...] = ()
    _group_cache: dict[tuple[str, bool], str] = field(default_factory=dict, compare=False)
    _expert_cache: dict[str, str | None] = field(default_factory=dict, compare=False)

    @property
    def phase_names(self) -> list[str]:
        """The phase names in order."""
        return [p.name for p in self.phases]

    def group_of(self, module_name: str, is_conv: bool) -> str:
        """The alpha group of a module: first matching user group, else its layer type."""
        key = (module_name, is_conv)
        group = self._group_cache.get(key)
        if group is None:
            group = next((name for name, rx in self.groups if rx.search(module_name)),
                         "conv" if is_conv else "linear")
            self._group_cache[key] = group
        return group

    def expert_of(self, module_name: str) -> str | None:
        """The expert whose pattern first matches the module name, or ``None``."""
        if module_name not in self._expert_cache:
            self._expert_cache[module_name] = next(
                (name for name, rx in self.experts if rx.search(module_name)), None)
        return self._expert_cache[module_name]

    def alpha(self, phase: Phase, module_name: str, is_conv: bool, expert: str | None) -> float:
        """The alpha of one module in ``phase`` (see the module docstring)."""
        if expert is None:
            expert = self.expert_of(module_name)
        group = self.group_of(module_name, is_conv)
        layer_type = "conv" if is_conv else "linear"
        specs = (phase.expert_alpha.get(expert) if expert is not None else None, phase.alpha)
        for spec in specs:
            if spec is None:
                continue
            if not isinstance(spec, dict):
                return float(spec)
            for key in (group, layer_type):
                if key in spec:
                    return float(spec[key])
        return self.default_alpha


def build_spec(model: SchemaModel) -> ControllerSpec:
    """Normalise a validated config model of either schema."""
    if isinstance(model, LoraTrainerPhasesConfig):
        return _from_lora(model)
    return _from_own(model)


def _alpha_spec(value: Any) -> AlphaSpec:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return float(value)


def _from_own(cfg: PhasesConfig) -> ControllerSpec:
    phases = []
    for p in cfg.phases:
        alpha = _alpha_spec(p.alpha)
        if alpha is None:  # resolved here so that Phase.alpha is always a number or a mapping
            alpha = cfg.alpha
        e = p.exit
        phases.append(Phase(
            name=p.name, min_steps=p.min_steps, max_steps=p.max_steps, alpha=alpha,
            expert_alpha={k: _alpha_spec(v) for k, v in p.expert_alpha.items()},
            lr_scale=p.lr_scale,
            exit=ExitSpec(threshold=e.relative_improvement_below, relative=True,
                          min_gradient_stability=e.min_gradient_stability, max_cv=e.max_cv,
                          min_r2=e.min_r2, require_r2=e.require_r2),
            display_alpha=alpha, quant_lambda=p.quant_lambda))
    return ControllerSpec(
        schema="gearshift", phases=tuple(phases), window=cfg.window, patience=cfg.patience,
        confidence=cfg.confidence, use_rslora=cfg.use_rslora, default_alpha=cfg.alpha,
        groups=tuple((n, re.compile(rx)) for n, rx in cfg.groups.patterns.items()),
        experts=tuple((n, re.compile(rx)) for n, rx in cfg.experts.patterns.items()))


def _from_lora(cfg: LoraTrainerPhasesConfig) -> ControllerSpec:
    linear = cfg.linear_alpha
    for key, value in (("mode", cfg.mode), ("_preset", cfg.preset)):
        if value is not None and value not in LORA_KNOWN_VALUES[key]:
            # The warnings module shows this once per message: once per run, not per build.
            warnings.warn(
                f"phases.{key}: {value!r} is not acted on — gearshift always moves through "
                f"the phases by the loss, with the thresholds written in the config (known "
                f"values: {', '.join(sorted(LORA_KNOWN_VALUES[key]))})", UserWarning,
                stacklevel=3)
    ignored = [f"per_expert.{e}.phases.{n}" for e, body in cfg.per_expert.items()
               for n, p in body.phases.items()
               if p.min_steps is not None or p.exit_criteria is not None]
    if ignored:
        warnings.warn(
            f"phases: min_steps / exit_criteria under {', '.join(ignored)} are not used: phase "
            "transitions are decided once for the whole model; only per-expert alpha applies",
            UserWarning, stacklevel=3)
    phases = []
    for name, p in cfg.conv_alpha_phases.items():
        e = p.exit_criteria
        expert_alpha: dict[str, AlphaSpec] = {
            expert: {"linear": linear, "conv": body.phases[name].alpha}
            for expert, body in cfg.per_expert.items() if name in body.phases}
        phases.append(Phase(
            name=name, min_steps=p.min_steps, max_steps=p.max_steps,
            alpha={"linear": linear, "conv": p.alpha}, expert_alpha=expert_alpha,
            lr_scale=p.lr_scale,
            exit=ExitSpec(threshold=e.loss_improvement_rate_below, relative=False,
                          min_gradient_stability=e.min_gradient_stability, max_cv=e.max_cv,
                          min_r2=e.min_loss_r2, require_r2=e.require_r2),
            display_alpha=p.alpha))
    experts = tuple(
        (name, re.compile(body.pattern) if body.pattern is not None
         else re.compile(re.escape(name), re.IGNORECASE))
        for name, body in cfg.per_expert.items())
    return ControllerSpec(
        schema="lora_trainer", phases=tuple(phases), window=cfg.window, patience=cfg.patience,
        confidence=cfg.confidence, use_rslora=cfg.use_rslora, default_alpha=linear,
        experts=experts)
