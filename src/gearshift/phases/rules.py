"""The transition criteria: one explainable check per rule, with its value and threshold.

With ``n`` losses of the current phase in the window, a least-squares line gives the slope ``b``
(loss per step) and its standard error ``se``. The *improvement rate* is ``r = -b / |mean|``
(gearshift schema: a fraction of the window's mean loss per step, so multiplying every loss by a
constant changes nothing) or ``r = -b`` (LoRA-trainer schema: absolute). With ``q`` the
one-sided ``confidence`` quantile of Student's t with ``n - 2`` degrees of freedom and ``τ`` the
plateau threshold, a check passes when:

``min_steps``
    ``steps_in_phase >= min_steps``.
``window``
    ``n >= window`` (samples from the current phase only; the window restarts at a transition).
``improvement_rate``
    ``r + q·se_r < τ`` — with the stated confidence the loss is *not still improving* by τ or
    more per step. A steeply falling loss fails this however noisy it is.
``rising_rate``
    ``-r + q·se_r < τ`` — nor rising by τ or more. Together with the previous check this is a
    two-one-sided-tests (TOST) equivalence test of ``|r| < τ``; it also needs the window to be
    precise enough (``q·se_r < τ``) before anything can pass: a window too short for the noise
    never transitions (see ``max_steps``).
``rising_trend``
    ``b / se <= q`` — the window shows no statistically significant rise, however slow.
``rising_trend_phase``
    the same t-test on a line through *every* loss of the phase: a slow, steady rise that one
    window cannot resolve becomes significant as the phase goes on.
``cv``
    coefficient of variation ``<= max_cv`` (skipped when ``max_cv`` is null).
``r2``
    R² of the window's fit ``>= min_r2``; reported, and blocking only with ``require_r2``
    (skipped when ``min_r2`` is null).
``gradient_stability``
    mean of the window's stability values ``>= min_gradient_stability``; skipped when no
    threshold is set or no stability value has been given in this phase.
``patience``
    all statistical checks above passed at ``patience`` consecutive updates that brought a
    loss, so one lucky window never triggers a transition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gearshift.phases.spec import Phase
from gearshift.phases.stats import Fit

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"

# (criterion, value, threshold, result, required)
Check = tuple[str, Any, Any, str, bool]


@dataclass(frozen=True)
class Evidence:
    """The numbers one check was made from (all ``None`` until there are 3 losses)."""

    n: int = 0
    mean: float | None = None
    slope: float | None = None
    slope_se: float | None = None
    rate: float | None = None
    rate_se: float | None = None
    improvement_upper: float | None = None
    rising_upper: float | None = None
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


def gather(window_fit: Fit | None, quantile: float | None, phase_fit: Fit | None,
           phase_quantile: float | None, relative: bool, stability: float | None,
           stability_n: int, n: int) -> Evidence:
    """Derive every number the checks need from the two fits."""
    if window_fit is None or quantile is None:
        return Evidence(n=n, stability=stability, stability_n=stability_n,
                        phase_n=phase_fit.n if phase_fit else 0)
    f = window_fit
    scale = abs(f.mean) if relative else 1.0
    rate = rate_se = up = rise = None
    if scale > 0.0:
        rate, rate_se = -f.slope / scale, f.se / scale
        up, rise = rate + quantile * rate_se, -rate + quantile * rate_se
    phase_t = _t(phase_fit.slope, phase_fit.se) if phase_fit is not None else None
    return Evidence(
        n=f.n, mean=f.mean, slope=f.slope, slope_se=f.se, rate=rate, rate_se=rate_se,
        improvement_upper=up, rising_upper=rise, quantile=quantile, t_slope=_t(f.slope, f.se),
        phase_n=phase_fit.n if phase_fit else 0, phase_t=phase_t, phase_quantile=phase_quantile,
        r2=f.r2, cv=f.cv, stability=stability, stability_n=stability_n)


def _below(value: float | None, threshold: float, strict: bool = True) -> str:
    if value is None:
        return FAIL
    return PASS if (value < threshold if strict else value <= threshold) else FAIL


def statistical_checks(phase: Phase, ev: Evidence) -> list[Check]:
    """The statistical checks of ``phase`` on ``ev`` (``skipped`` before 3 losses)."""
    ex = phase.exit
    if ev.quantile is None:  # fewer than 3 losses: nothing to judge yet
        return [("improvement_rate", None, ex.threshold, SKIPPED, True),
                ("rising_rate", None, ex.threshold, SKIPPED, True),
                ("rising_trend", None, None, SKIPPED, True),
                ("rising_trend_phase", None, None, SKIPPED, True),
                ("cv", None, ex.max_cv, SKIPPED, True),
                ("r2", None, ex.min_r2, SKIPPED, ex.require_r2),
                ("gradient_stability", ev.stability, ex.min_gradient_stability, SKIPPED, True)]
    out = [
        ("improvement_rate", ev.improvement_upper, ex.threshold,
         _below(ev.improvement_upper, ex.threshold), True),
        ("rising_rate", ev.rising_upper, ex.threshold, _below(ev.rising_upper, ex.threshold), True),
        ("rising_trend", ev.t_slope, ev.quantile, _below(ev.t_slope, ev.quantile, False), True),
    ]
    if ev.phase_t is None or ev.phase_quantile is None:
        out.append(("rising_trend_phase", None, None, SKIPPED, True))
    else:
        out.append(("rising_trend_phase", ev.phase_t, ev.phase_quantile,
                    _below(ev.phase_t, ev.phase_quantile, False), True))
    if ex.max_cv is None:
        out.append(("cv", ev.cv, None, SKIPPED, True))
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


def explain_lines(s: dict[str, Any]) -> list[str]:
    """A status dict (:meth:`PhaseScheduler.status`) as a few lines for a human."""
    st = s["statistics"]
    return [
        f"phase {s['progress']} {s['phase']!r} (alpha {s['alpha']}, lr x{s['lr_scale']:g}): "
        f"{s['steps_in_phase']} steps in phase, {s['total_steps']} total"
        + (f", max {s['max_steps']}" if s["max_steps"] is not None else ""),
        f"window {st['n']}/{st['window']} losses: "
        + (f"mean {_fmt(st['mean'])}, slope {_fmt(st['slope'])}/step, improvement rate "
           f"{_fmt(st['rate'])}/step (upper bound {_fmt(st['improvement_upper'])}), "
           f"R² {_fmt(st['r2'])}, CV {_fmt(st['cv'])}" if st["mean"] is not None
           else "too few for a fit")
        + f"; stability {_fmt(st['stability'])} ({st['stability_n']} values)",
        *([] if s["last_decision_phase"] in (None, s["phase"])
          else [f"checks that ended phase {s['last_decision_phase']!r}:"]),
        *render(s["last_decision"]),
        f"-> {s['outcome']}",
    ]


def render(checks: list[dict[str, Any]]) -> list[str]:
    """One line per check, for :meth:`PhaseScheduler.explain`."""
    ops = {"improvement_rate": "<", "rising_rate": "<", "min_steps": ">=", "window": ">=",
           "patience": ">=", "r2": ">=", "gradient_stability": ">="}
    lines = []
    for c in checks:
        op = ops.get(c["criterion"], "<=")
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
