"""The transition criteria: one explainable check per rule, with its value and threshold.

**The plateau rule.** A phase is done when there is no longer evidence that the loss is still
improving by the threshold ``τ`` per step — not when there is proof that it has stopped, which a
noisy loss never gives. With ``n`` losses, a least-squares line gives the slope ``b`` and its
standard error ``se``. The *improvement rate* is ``r = -b / |mean|`` (gearshift schema: a
fraction of the mean loss per step, so multiplying every loss by a constant changes nothing) or
``r = -b`` (LoRA-trainer schema: absolute), with standard error ``se_r``. ``q`` is the one-sided
``confidence`` quantile of Student's t with ``n - 2`` degrees of freedom.

**The sample follows the noise.** "No evidence of improvement" only means something if the fit
could have seen one: its resolution ``q·se_r`` must be at most ``1.5·τ`` (:data:`RESOLUTION`),
so that a loss still falling by 5·τ per step keeps its lower confidence bound above ``τ``. ``se_r`` shrinks
like ``noise · n^-1.5``; when the last ``window`` losses are too few for the noise, the fit over
the last 2, 4 and 8 windows and finally every loss of the phase is tried, in that order,
and the first that resolves ``τ`` is judged. When none does yet, ``explain()`` says how many
losses this noise needs: ``n ≈ (12 · (q · noise / (|mean| · 1.5 · τ))²)^(1/3)``. Evidence of
improvement from a resolving window up to twice as long as the judged one keeps the phase going
as well.

A check passes when:

``min_steps``
    ``steps_in_phase >= min_steps``.
``window``
    ``n >= window`` (samples from the current phase only; the window restarts at a transition).
``improvement_rate``
    ``r - q·se_r < τ`` — the lower confidence bound of the improvement rate (the largest over
    the windows that resolve): there is no evidence that the loss still improves by τ or more
    per step.
``resolution``
    ``q·se_r <= 1.5·τ`` on the fit judged: it is long enough for this noise to tell a plateau
    from a steady fall (else: "window too short for this noise: need ~N losses").
``rising_trend``
    ``b / se <= q`` over the last ``window`` losses — no statistically significant rise.
``rising_trend_phase``
    the same t-test on a line through *every* loss of the phase, at the stricter level of
    :func:`phase_confidence` (0.999 at the default 0.95): a slow, steady rise that one window
    cannot resolve becomes significant as the phase goes on.
``cv``
    the stability of the loss *level*: the standard deviation of the means of 10 consecutive
    blocks of the last window over their mean, ``<= max_cv`` (skipped when ``max_cv`` is
    null). Per-step noise barely moves it (it shrinks like ``1/sqrt(block)``); a level that
    jumps or swings does (see :mod:`gearshift.phases.level`).
``r2``
    R² of the fit judged ``>= min_r2``; reported, and blocking only with ``require_r2``
    (skipped when ``min_r2`` is null).
``gradient_stability``
    mean of the window's stability values ``>= min_gradient_stability``; skipped when no
    threshold is set or no stability value has been given in this phase.
``patience``
    all checks above passed at ``patience`` consecutive updates that brought a loss, so one
    lucky window never triggers a transition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gearshift.phases.spec import ExitSpec, Phase
from gearshift.phases.stats import Fit

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"

#: The fit judged must resolve the threshold: ``q·se_r <= RESOLUTION · τ``.
RESOLUTION = 1.5

# (criterion, value, threshold, result, required)
Check = tuple[str, Any, Any, str, bool]


@dataclass(frozen=True)
class Evidence:
    """The numbers one check was made from (all ``None`` until there are 3 losses).

    ``n`` counts the losses in the statistics window; ``span`` those of the fit the rate was
    judged on (the window, 2, 4 or 8 windows, or the whole phase); ``needed`` is how many
    losses this noise needs for the resolution check.
    """

    n: int = 0
    span: int = 0
    mean: float | None = None
    slope: float | None = None
    slope_se: float | None = None
    rate: float | None = None
    rate_se: float | None = None
    improvement_lower: float | None = None
    resolution: float | None = None
    needed: int | None = None
    noise_cv: float | None = None
    quantile: float | None = None
    t_slope: float | None = None
    phase_n: int = 0
    phase_t: float | None = None
    phase_quantile: float | None = None
    r2: float | None = None
    cv: float | None = None
    stability: float | None = None
    stability_n: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The numbers as a dict (non-finite floats as strings, for JSON)."""
        return {k: json_number(v) for k, v in self.__dict__.items()}


def json_number(value: Any) -> Any:
    """``value`` unchanged unless it is a non-finite float: then ``"inf"``, ``"-inf"``, None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _t(slope: float, se: float) -> float:
    if se > 0.0:
        return slope / se
    return 0.0 if slope == 0.0 else math.copysign(math.inf, slope)


def phase_confidence(confidence: float) -> float:
    """The level of the whole-phase rising test: ``1 - (1 - confidence) / 50`` (0.999 at 0.95).

    The window's tests look at statistics that renew every ``window`` steps, and ``patience``
    absorbs their occasional false alarms. The whole-phase slope changes slowly, so a false
    alarm there would persist for as long as the phase lasts: it must be rarer. A real rise
    still shows, because its t-statistic grows like ``n^1.5``.
    """
    return 1.0 - (1.0 - confidence) / 50.0


def needed_losses(noise: float, scale: float, quantile: float, threshold: float) -> int:
    """Losses a fit needs so that ``q·se_r <= RESOLUTION·τ`` at this per-step noise.

    From ``se_r = noise / scale · sqrt(12 / (n³ − n))`` for consecutive steps.
    """
    if noise <= 0.0:
        return 3
    ratio = quantile * noise / (scale * RESOLUTION * threshold)
    return max(3, math.ceil((12.0 * ratio * ratio) ** (1.0 / 3.0)))


def gather(windows: Sequence[Fit], phase: Fit | None, quantile: Callable[[int], float],
           phase_quantile: Callable[[int], float], exit_spec: ExitSpec,
           level_cv: float | None, stability: float | None, stability_n: int,
           n: int) -> Evidence:
    """Derive every number the checks need.

    The rate is *judged* on the first fit that resolves the threshold: the windows, shortest
    first, then every loss of the phase when it is longer than all of them; when none resolves
    yet, on the longest (and ``needed`` says how many losses would). Evidence of improvement
    from the windows up to twice as long as the judged fit counts too: the reported lower bound
    is the largest among them, so a fall that one window happens to hide is still seen.

    Args:
        windows: The fit over the statistics window (possibly not full yet), then those over
            2, 4 and 8 windows once they are full.
        phase: The fit over every loss of the phase.
        quantile: ``df -> q`` at the configured confidence.
        phase_quantile: ``df -> q`` for the whole-phase rising test (:func:`phase_confidence`).
        exit_spec: The current phase's exit criteria.
        level_cv: The level stability (:class:`~gearshift.phases.level.LevelBlocks`).
        stability: Mean gradient stability of the window, ``stability_n`` values.
        n: Losses in the statistics window.
    """
    phase_n = phase.n if phase is not None else 0
    if not windows:
        return Evidence(n=n, stability=stability, stability_n=stability_n, phase_n=phase_n)
    window, tau = windows[0], exit_spec.threshold
    candidates = list(windows)
    if phase is not None and phase.n > windows[-1].n:
        candidates.append(phase)
    rows = []  # (fit, q, scale, rate, rate_se, resolves)
    for f in candidates:
        scale = abs(f.mean) if exit_spec.relative else 1.0
        if scale == 0.0:
            continue
        q = quantile(f.n - 2)
        rate_se = f.se / scale
        rows.append((f, q, scale, -f.slope / scale, rate_se, q * rate_se <= RESOLUTION * tau))
    if not rows:  # a mean of exactly 0: no relative rate
        return Evidence(n=n, span=window.n, mean=window.mean, slope=window.slope,
                        slope_se=window.se, quantile=quantile(window.n - 2),
                        t_slope=_t(window.slope, window.se), phase_n=phase_n, r2=window.r2,
                        cv=level_cv, stability=stability, stability_n=stability_n)
    judged = next((r for r in rows if r[5]), rows[-1])
    # Evidence of improvement counts from the judged fit and from the resolving windows up to
    # twice as long: a fall that the judged fit happens to hide still shows in the next one,
    # while much longer windows, which remember the steep start of the phase, do not delay the
    # end of a fall that has flattened.
    lower = max(r[3] - r[1] * r[4] for r in rows
                if r is judged or (r[5] and r[0] is not phase and r[0].n <= 2 * judged[0].n))
    f, q, scale, rate, rate_se, _ = judged
    return Evidence(
        n=n, span=f.n, mean=f.mean, slope=f.slope, slope_se=f.se, rate=rate, rate_se=rate_se,
        improvement_lower=lower, resolution=q * rate_se,
        needed=needed_losses(f.noise, scale, q, tau),
        noise_cv=f.noise / abs(f.mean) if f.mean != 0.0 else None,
        quantile=quantile(window.n - 2), t_slope=_t(window.slope, window.se), phase_n=phase_n,
        phase_t=_t(phase.slope, phase.se) if phase is not None else None,
        phase_quantile=phase_quantile(phase.n - 2) if phase is not None else None, r2=f.r2,
        cv=level_cv, stability=stability, stability_n=stability_n)


def _below(value: float | None, threshold: float, strict: bool = True) -> str:
    if value is None:
        return FAIL
    return PASS if (value < threshold if strict else value <= threshold) else FAIL


def statistical_checks(phase: Phase, ev: Evidence) -> list[Check]:
    """The statistical checks of ``phase`` on ``ev`` (``skipped`` before 3 losses)."""
    ex = phase.exit
    limit = RESOLUTION * ex.threshold
    if ev.quantile is None:  # fewer than 3 losses: nothing to judge yet
        return [("improvement_rate", None, ex.threshold, SKIPPED, True),
                ("resolution", None, limit, SKIPPED, True),
                ("rising_trend", None, None, SKIPPED, True),
                ("rising_trend_phase", None, None, SKIPPED, True),
                ("cv", None, ex.max_cv, SKIPPED, True),
                ("r2", None, ex.min_r2, SKIPPED, ex.require_r2),
                ("gradient_stability", ev.stability, ex.min_gradient_stability, SKIPPED, True)]
    out = [
        ("improvement_rate", ev.improvement_lower, ex.threshold,
         _below(ev.improvement_lower, ex.threshold), True),
        ("resolution", ev.resolution, limit, _below(ev.resolution, limit, False), True),
        ("rising_trend", ev.t_slope, ev.quantile, _below(ev.t_slope, ev.quantile, False), True),
    ]
    if ev.phase_t is None or ev.phase_quantile is None:
        out.append(("rising_trend_phase", None, None, SKIPPED, True))
    else:
        out.append(("rising_trend_phase", ev.phase_t, ev.phase_quantile,
                    _below(ev.phase_t, ev.phase_quantile, False), True))
    if ex.max_cv is None:
        out.append(("cv", ev.cv, None, SKIPPED, True))
    elif ev.cv is None:  # fewer than two blocks of the window so far
        out.append(("cv", None, ex.max_cv, SKIPPED, True))
    else:
        out.append(("cv", ev.cv, ex.max_cv, _below(ev.cv, ex.max_cv, False), True))
    if ex.min_r2 is None:
        out.append(("r2", ev.r2, None, SKIPPED, ex.require_r2))
    else:
        ok = ev.r2 is not None and ev.r2 >= ex.min_r2
        out.append(("r2", ev.r2, ex.min_r2, PASS if ok else FAIL, ex.require_r2))
    if ex.min_gradient_stability is None or ev.stability is None:
        out.append(("gradient_stability", ev.stability, ex.min_gradient_stability, SKIPPED, True))
    else:
        ok = ev.stability >= ex.min_gradient_stability
        out.append(("gradient_stability", ev.stability, ex.min_gradient_stability,
                    PASS if ok else FAIL, True))
    return out


def blocking(checks: list[Check]) -> list[str]:
    """Names of the required checks that failed."""
    return [c[0] for c in checks if c[3] == FAIL and c[4]]


def as_dicts(checks: list[Check] | tuple[Check, ...]) -> list[dict[str, Any]]:
    """Checks as JSON-safe dicts ``{criterion, value, threshold, result, required}``."""
    return [{"criterion": c, "value": json_number(v), "threshold": json_number(t), "result": r,
             "required": req} for c, v, t, r, req in checks]


OPS = {"improvement_rate": "<", "min_steps": ">=", "window": ">=", "patience": ">=",
       "r2": ">=", "gradient_stability": ">="}
# The criteria a one-line transition summary names (the plateau evidence, not the bookkeeping).
DECIDING = ("improvement_rate", "resolution", "cv", "r2", "gradient_stability")


def summary(record: dict[str, Any]) -> str:
    """The numbers that decided a transition (a ``transition_history`` entry), in one clause.

    Example: ``plateau: improvement_rate -0.000181 < 0.0002, resolution 0.000195 <= 0.0002,
    cv 0.0412 <= 0.5``.
    """
    parts = [f"{c['criterion']} {c['value']:.3g} {OPS.get(c['criterion'], '<=')} "
             f"{c['threshold']:.3g}"
             for c in record.get("criteria") or []
             if c.get("criterion") in DECIDING and c.get("result") == PASS
             and isinstance(c.get("value"), int | float) and c.get("threshold") is not None]
    return f"{record['reason']}: {', '.join(parts)}" if parts else str(record["reason"])


def explain_lines(s: dict[str, Any]) -> list[str]:
    """A status dict (:meth:`PhaseScheduler.status`) as a few lines for a human."""
    st = s["statistics"]
    lines = [
        f"phase {s['progress']} {s['phase']!r} (alpha {s['alpha']}, lr x{s['lr_scale']:g}): "
        f"{s['steps_in_phase']} steps in phase, {s['total_steps']} total"
        + (f", max {s['max_steps']}" if s["max_steps"] is not None else ""),
        f"window {st['n']}/{st['window']} losses: "
        + (f"rate judged over the last {st['span']}: mean {_fmt(st['mean'])}, improvement "
           f"rate {_fmt(st['rate'])}/step ± {_fmt(st['resolution'])} (lower bound "
           f"{_fmt(st['improvement_lower'])}), per-step noise CV {_fmt(st['noise_cv'])}, level "
           f"CV {_fmt(st['cv'])}, R² {_fmt(st['r2'])}" if st["mean"] is not None
           else "too few for a fit")
        + f"; stability {_fmt(st['stability'])} ({st['stability_n']} values)",
    ]
    decided_here = s["last_decision_phase"] in (None, s["phase"])
    resolution = next((c for c in s["last_decision"] if c["criterion"] == "resolution"), None)
    if decided_here and resolution is not None and resolution["result"] == FAIL \
            and st.get("needed") is not None:
        lines.append(f"window too short for this noise: need ~{st['needed']} losses in the phase "
                     f"to tell a plateau from a fall of {_fmt(resolution['threshold'])}/step "
                     f"(have {st['phase_n']}; longer windows are used as the phase grows)")
    if not decided_here:
        lines.append(f"checks that ended phase {s['last_decision_phase']!r}:")
    return [*lines, *render(s["last_decision"]), f"-> {s['outcome']}"]


def render(checks: list[dict[str, Any]]) -> list[str]:
    """One line per check, for :meth:`PhaseScheduler.explain`."""
    lines = []
    for c in checks:
        op = OPS.get(c["criterion"], "<=")
        note = "" if c["required"] else " (advisory)"
        if c["result"] == SKIPPED:
            configurable = c["criterion"] in ("cv", "r2", "gradient_stability")
            why = "not configured" if configurable and c["threshold"] is None else "no data yet"
            lines.append(f"  [skip] {c['criterion']:<19} {why}{note}")
        else:
            lines.append(f"  [{c['result']}] {c['criterion']:<19} {_fmt(c['value'])} {op} "
                         f"{_fmt(c['threshold'])}{note}")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)
