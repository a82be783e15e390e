"""The phase controller: moves a run through named phases when the current one is done.

See :mod:`gearshift.phases.rules` for the transition criteria and
:mod:`gearshift.phases.spec` for how a module's alpha is resolved.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

from gearshift.errors import ConfigError, Problem
from gearshift.phases import rules
from gearshift.phases.level import LevelBlocks
from gearshift.phases.rules import FAIL, PASS, Check, Evidence
from gearshift.phases.spec import ControllerSpec, Phase, build_spec
from gearshift.phases.state import LONG_WINDOWS, STATE_VERSION, decode_state, plain
from gearshift.phases.stats import Fit, PhaseTrend, RollingFit, RollingMean, t_quantile
from gearshift.phases.validate import parse_phases_config


class _ExpertStats:
    __slots__ = ("fit", "stability")

    def __init__(self, window: int) -> None:
        self.fit = RollingFit(window)
        self.stability = RollingMean(window)


class PhaseScheduler:
    """Moves training through named phases (e.g. LoRA alpha ``foundation → balance → emphasis``).

    Call :meth:`update` once per optimizer step — never per micro-batch, never for a step that
    was skipped (OOM, NaN). A phase ends when its plateau criteria (:mod:`gearshift.phases.rules`)
    have held for ``patience`` consecutive checks after ``min_steps``, or when ``max_steps`` is
    reached; the last phase is never left. Every check is kept for :meth:`status` and
    :meth:`explain`, every transition in :attr:`transition_history`.

    Distributed runs: the controller never communicates. Reduce the loss and the stability across
    ranks (e.g. ``accelerator.reduce(loss, "mean")``) *before* calling :meth:`update`; the update is
    a pure function of its arguments and the state, so every rank then decides identically.

    Args:
        config: A :class:`~gearshift.phases.schema.PhasesConfig` or
            :class:`~gearshift.phases.schema.LoraTrainerPhasesConfig`, a raw mapping of either
            schema (validated, :class:`~gearshift.errors.ConfigError` listing every problem), or
            a :class:`~gearshift.phases.spec.ControllerSpec`. ``enabled`` is not
            looked at here (see :func:`build_phase_scheduler`).
        rank: LoRA rank used by :meth:`get_scale` when it is called with ``rank=None``.

    Example:
        >>> sched = PhaseScheduler({"window": 10, "patience": 1,
        ...                         "phases": [{"name": "a", "alpha": 8, "min_steps": 0},
        ...                                    {"name": "b", "alpha": 16}]})
        >>> [sched.update(step, loss=1.0) for step in range(10)][-1]
        True
        >>> sched.current_phase.name, sched.get_scale("q_proj", 8)
        ('b', 2.0)
    """

    def __init__(self, config: Any, *, rank: int | None = None) -> None:
        if isinstance(config, ControllerSpec):
            spec = config
        else:
            model = parse_phases_config(config)
            if model is None:
                raise ConfigError([Problem("phases", "no phases configured")])
            spec = build_spec(model)
        if not spec.phases:
            raise ConfigError([Problem("phases", "no phases configured")])
        self.spec = spec
        self.rank = _check_rank(rank)
        self._phase_confidence = rules.phase_confidence(spec.confidence)
        self._reset()

    def _reset(self) -> None:
        window = self.spec.window
        self.phase_index = 0
        self.steps_in_phase = 0
        self.total_steps = 0
        self.last_step: int | None = None
        self.transition_history: list[dict[str, Any]] = []
        self._streak = 0
        self._ignored = 0
        self._window = RollingFit(window)
        # Longer windows, judged when the last `window` losses are too few for the noise.
        self._long = tuple(RollingFit(k * window) for k in LONG_WINDOWS)
        self._trend = PhaseTrend()
        self._level = LevelBlocks(window)
        self._stability = RollingMean(window)
        self._experts: dict[str, _ExpertStats] = {}
        self._checks: tuple[Check, ...] = ()
        self._evidence = Evidence()
        self._outcome = "no update yet"
        self._decided_in: str | None = None

    # ----------------------------------------------------------------------- properties

    @property
    def phases(self) -> tuple[Phase, ...]:
        """Every phase, in order."""
        return self.spec.phases

    @property
    def current_phase(self) -> Phase:
        """The phase in force (``.name``, ``.alpha``, ``.min_steps``, ``.exit``, ...)."""
        return self.spec.phases[self.phase_index]

    @property
    def current_lr_scale(self) -> float:
        """Multiplier the trainer applies to the scheduled learning rate in this phase."""
        return self.current_phase.lr_scale

    @property
    def is_last_phase(self) -> bool:
        """Whether the current phase is the last one (it is never left)."""
        return self.phase_index == len(self.spec.phases) - 1

    # ----------------------------------------------------------------------- update

    def update(self, step: int, loss: float | None = None,
               gradient_stability: float | None = None, expert: str | None = None) -> bool:
        """Record one optimizer step and decide; return True when this call made a transition.

        Args:
            step: The optimizer step (strictly increasing across calls); it is the x of the
                least-squares fit, so the slope is per optimizer step even if steps are skipped.
            loss: The step's loss (any float-convertible scalar). ``None`` leaves every
                statistic untouched but still counts the step in the phase; a non-finite loss is
                ignored the same way and also restarts the patience count.
            gradient_stability: The step's gradient-sign agreement in ``[0, 1]`` (optional).
            expert: The MoE expert this step trained; its per-expert statistics are filled as
                well as the global ones (decisions are global).

        Raises:
            ValueError: ``step`` is not an integer ``>= 0`` or does not increase, or a value is
                not convertible to float; nothing is recorded then.
        """
        step = _check_step(step, self.last_step)
        # Convert first: a bad argument must raise before anything is counted.
        value = None if loss is None else float(loss)
        stab = None if gradient_stability is None else float(gradient_stability)
        self.last_step = step
        self.total_steps += 1
        self.steps_in_phase += 1
        per_expert = self._expert(expert) if expert is not None else None
        fresh = False
        if value is not None and math.isfinite(value):
            self._window.add(step, value)
            for fit in self._long:
                fit.add(step, value)
            self._trend.add(step, value)
            self._level.add(value)
            if per_expert is not None:
                per_expert.fit.add(step, value)
            fresh = True
        elif value is not None:
            self._ignored += 1
            self._streak = 0
        if stab is not None and math.isfinite(stab):
            self._stability.add(stab)
            if per_expert is not None:
                per_expert.stability.add(stab)
        return self._decide(step, fresh)

    def _quantile(self, df: int) -> float:
        return t_quantile(self.spec.confidence, df)

    def _phase_quantile(self, df: int) -> float:
        return t_quantile(self._phase_confidence, df)

    def _decide(self, step: int, fresh: bool) -> bool:
        phase = self.current_phase
        spec = self.spec
        window_ok = len(self._window) >= spec.window
        windows = self._windows(window_ok)
        ev = rules.gather(
            windows, self._trend.fit() if windows else None, self._quantile,
            self._phase_quantile, phase.exit, self._level.cv(), self._stability.mean(),
            len(self._stability), len(self._window))
        checks = rules.statistical_checks(phase, ev)
        if fresh:
            self._streak = self._streak + 1 if window_ok and not rules.blocking(checks) else 0
        sip = self.steps_in_phase
        self._checks = (
            ("min_steps", sip, phase.min_steps, PASS if sip >= phase.min_steps else FAIL, True),
            ("window", len(self._window), spec.window, PASS if window_ok else FAIL, True),
            *checks,
            ("patience", self._streak, spec.patience,
             PASS if self._streak >= spec.patience else FAIL, True),
        )
        self._evidence = ev
        self._decided_in = phase.name
        if self.is_last_phase:
            self._outcome = "last phase: never left"
            return False
        failed = rules.blocking(list(self._checks))
        if not failed:
            self._transition(step, "plateau")
            return True
        if phase.max_steps is not None and sip >= phase.max_steps:
            self._transition(step, "max_steps")
            return True
        self._outcome = "stay: " + ", ".join(failed)
        return False

    def _windows(self, window_ok: bool) -> list[Fit]:
        """The statistics window's fit, then those of the longer windows that are full."""
        first = self._window.fit()
        if first is None:
            return []
        out = [first]
        if window_ok:
            out.extend(f for f in (w.fit() for w in self._long if len(w) == w.capacity)
                       if f is not None)
        return out

    def _transition(self, step: int, reason: str) -> None:
        old, new = self.current_phase, self.spec.phases[self.phase_index + 1]
        self.transition_history.append({
            "step": step, "from_phase": old.name, "to_phase": new.name,
            "from_alpha": plain(old.display_alpha), "to_alpha": plain(new.display_alpha),
            "steps_in_phase": self.steps_in_phase, "reason": reason,
            "total_steps": self.total_steps, "from_lr_scale": old.lr_scale,
            "to_lr_scale": new.lr_scale, "statistics": self._evidence.as_dict(),
            "criteria": rules.as_dicts(self._checks),
        })
        self.phase_index += 1
        self.steps_in_phase = 0
        self._streak = 0
        self._window.clear()
        for fit in self._long:
            fit.clear()
        self._trend.clear()
        self._level.clear()
        self._stability.clear()
        self._experts.clear()
        self._evidence = Evidence()  # the deciding numbers are kept in the history entry
        self._outcome = f"transition ({reason}): {old.name} -> {new.name}"

    def _expert(self, name: str) -> _ExpertStats:
        stats = self._experts.get(name)
        if stats is None:
            stats = self._experts[name] = _ExpertStats(self.spec.window)
        return stats

    # ----------------------------------------------------------------------- alpha

    def get_alpha(self, module_name: str, is_conv: bool = False,
                  expert: str | None = None) -> float:
        """The LoRA alpha of ``module_name`` in the current phase.

        Args:
            module_name: Qualified module name (matched against group / expert patterns).
            is_conv: Whether the LoRA layer wraps a convolution.
            expert: The MoE expert; ``None`` = inferred from the expert patterns.
        """
        return self.spec.alpha(self.current_phase, module_name, is_conv, expert)

    def get_scale(self, module_name: str, rank: int | None, is_conv: bool = False,
                  expert: str | None = None) -> float:
        """The LoRA scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``.

        ``rank=None`` uses the rank given to the constructor.
        """
        r = _check_rank(rank) if rank is not None else self.rank
        if r is None:
            raise ValueError("get_scale needs a LoRA rank: pass rank= here or to the scheduler")
        alpha = self.get_alpha(module_name, is_conv, expert)
        return alpha / math.sqrt(r) if self.spec.use_rslora else alpha / r

    # ----------------------------------------------------------------------- explain

    def status(self) -> dict[str, Any]:
        """Where the controller stands and why, as a JSON-safe dict.

        Keys: ``schema``, ``phase``, ``phase_index``, ``progress`` (``"k/N"``), ``phases``,
        ``steps_in_phase``, ``total_steps``, ``step``, ``alpha``, ``lr_scale``, ``min_steps``,
        ``max_steps``, ``patience`` / ``streak``, ``statistics`` (window size and the numbers of
        :class:`~gearshift.phases.rules.Evidence` for the current phase's window),
        ``last_decision`` (every criterion of the latest check with value, threshold, result and
        whether it is required; right after a transition, the check that made it, with
        ``last_decision_phase`` naming the phase it ended), ``outcome``, ``experts``
        (per-expert window statistics), ``ignored_losses`` and ``transitions``.
        """
        phase = self.current_phase
        experts = {}
        for name, st in self._experts.items():
            f = st.fit.fit()
            experts[name] = {"n": len(st.fit), "mean": st.fit.mean(),
                             "slope": f.slope if f else None, "r2": f.r2 if f else None,
                             "cv": f.cv if f else None, "stability": st.stability.mean(),
                             "stability_n": len(st.stability)}
        return {
            "schema": self.spec.schema, "phase": phase.name, "phase_index": self.phase_index,
            "progress": f"{self.phase_index + 1}/{len(self.spec.phases)}",
            "phases": self.spec.phase_names, "steps_in_phase": self.steps_in_phase,
            "total_steps": self.total_steps, "step": self.last_step,
            "alpha": plain(phase.display_alpha), "lr_scale": phase.lr_scale,
            "min_steps": phase.min_steps, "max_steps": phase.max_steps,
            "patience": self.spec.patience, "streak": self._streak,
            "statistics": {"window": self.spec.window, **self._evidence.as_dict()},
            "last_decision": rules.as_dicts(self._checks), "last_decision_phase": self._decided_in,
            "outcome": self._outcome, "experts": {k: {kk: rules.json_number(vv) for kk, vv in v.items()}
                        for k, v in experts.items()},
            "ignored_losses": self._ignored, "transitions": len(self.transition_history),
        }

    def explain(self) -> str:
        """:meth:`status` for a human: the phase, the statistics and one line per criterion."""
        return "\n".join(rules.explain_lines(self.status()))

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Every counter, buffer and running sum as a versioned, JSON-safe dict.

        Loads through ``json`` (``allow_nan=False``) and ``torch.load(weights_only=True)``; a
        controller loaded from it makes bit-identical decisions. The thresholds and alphas are
        *not* stored: on resume the config wins for those, the checkpoint for the counters.
        """
        return {
            "version": STATE_VERSION, "schema": self.spec.schema,
            "phase_names": self.spec.phase_names, "phase_index": self.phase_index,
            "steps_in_phase": self.steps_in_phase, "total_steps": self.total_steps,
            "last_step": self.last_step, "streak": self._streak, "ignored_losses": self._ignored,
            "transition_history": plain(self.transition_history),
            "window": self._window.state(), "long_windows": [f.state() for f in self._long],
            "level": self._level.state(), "trend": self._trend.state(),
            "stability": self._stability.state(),
            "experts": {k: {"window": v.fit.state(), "stability": v.stability.state()}
                        for k, v in self._experts.items()},
            "last_decision": rules.as_dicts(self._checks), "evidence": self._evidence.as_dict(),
            "outcome": self._outcome, "last_decision_phase": self._decided_in,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output, replacing *all* current state.

        Keys missing from an older state take their fresh-start values, with a warning. Nothing
        changes unless the whole state is valid.

        Raises:
            CheckpointError: Malformed state, unsupported version, or phase names that differ
                from the config's (both lists are named).
        """
        fresh = PhaseScheduler(self.spec, rank=self.rank)
        d = decode_state(state, fresh.state_dict(), self.spec)
        self.phase_index = d["phase_index"]
        self.steps_in_phase = d["steps_in_phase"]
        self.total_steps = d["total_steps"]
        self.last_step = d["last_step"]
        self.transition_history = d["transition_history"]
        self._streak = d["streak"]
        self._ignored = d["ignored_losses"]
        self._window, self._trend, self._stability = d["window"], d["trend"], d["stability"]
        self._long, self._level = d["long_windows"], d["level"]
        self._experts = {}
        for name, (fit, mean) in d["experts"].items():
            st = self._experts[name] = _ExpertStats(self.spec.window)
            st.fit, st.stability = fit, mean
        self._checks = d["last_decision"]
        self._evidence = d["evidence"]
        self._outcome = d["outcome"]
        self._decided_in = d["last_decision_phase"]


def build_phase_scheduler(config: Any, *, rank: int | None = None) -> PhaseScheduler | None:
    """Build the phase controller from a ``phases:`` section, or ``None`` when there is none.

    Args:
        config: ``None``, a mapping of either schema (as read from YAML under ``phases:``), or a
            validated :class:`~gearshift.phases.schema.PhasesConfig` /
            :class:`~gearshift.phases.schema.LoraTrainerPhasesConfig`.
        rank: Default LoRA rank for :meth:`PhaseScheduler.get_scale`.

    Returns:
        ``None`` when ``config`` is ``None``, empty or has ``enabled: false`` (the run then
        behaves exactly as without phases), else a fresh :class:`PhaseScheduler`.

    Raises:
        ConfigError: Every problem of the section, paths starting with ``phases.``.

    Example:
        >>> build_phase_scheduler({"enabled": False}) is None
        True
    """
    if config is None:
        return None
    model = parse_phases_config(config)
    if model is None or not model.enabled:
        return None
    return PhaseScheduler(model, rank=rank)


def _check_step(step: Any, last: int | None) -> int:
    try:
        value = operator.index(step) if not isinstance(step, bool) else None
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if last is not None and value <= last:
        raise ValueError(
            f"step {value} does not follow step {last}: update() is called once per optimizer "
            "step with increasing steps (after a resume, load_state_dict() first)")
    return value


def _check_rank(rank: Any) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return rank
