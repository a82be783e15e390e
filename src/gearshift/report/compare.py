"""Comparing runs arm by arm: final and best metric over seeds, failures, and a verdict per arm.

``compare_runs({"control": [run, run, run], "warmup": [...]}, metric="eval/loss",
control="control")`` reads every run through :mod:`gearshift.rundir` and gives a
:class:`Comparison` whose :attr:`~Comparison.stats` is what ``stats.json`` holds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gearshift.errors import UsageError
from gearshift.report import stats as st
from gearshift.report.runs import RunData, load_run

#: Final metric worse than the run's best by more than this fraction: the run collapsed.
COLLAPSE_TOLERANCE = 0.1
#: Config keys that differ between runs on purpose and are not "differences between arms".
IGNORED_KEYS = ("name", "seed", "output_dir", "resume")
STATS_FILE = "stats.json"
SUMMARY_FILE = "summary.md"


def run_outcome(run: RunData, metric: str, *, maximize: bool,
                collapse_tolerance: float) -> dict[str, Any]:
    """Final and best value of ``metric`` in one run, the step of the best, and its failures.

    ``collapsed``: the final value is finite and worse than the run's best by more than
    ``collapse_tolerance`` (a fraction of the best's magnitude). ``diverged``: a non-finite
    loss or eval metric was logged, or the NaN / out-of-memory guard stopped the run.
    """
    series = run.series(metric)
    finite = [(s, v) for s, v in series if math.isfinite(v)]
    final = series[-1][1] if series else None
    best_step, best = (None, None)
    if finite:
        pick = max if maximize else min
        best_step, best = pick(finite, key=lambda sv: sv[1])
    collapsed = False
    if final is not None and best is not None and math.isfinite(final):
        worse_by = (best - final) if maximize else (final - best)
        collapsed = worse_by > collapse_tolerance * abs(best)
    return {"run": str(run.path), "seed": run.config.seed if run.config else None,
            "state": run.status.state, "steps": run.last_step,
            "final": final, "best": best, "step_of_best": best_step,
            "diverged": run.diverged, "collapsed": collapsed,
            "time_s": run.status.active_seconds, "tokens_per_s": run.throughput}


def _mean(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None and math.isfinite(v)]
    return sum(found) / len(found) if found else None


@dataclass
class Comparison:
    """The runs of every arm and their statistics.

    Attributes:
        metric: The metric compared (e.g. ``eval/loss``).
        control: The arm the others are compared with.
        maximize: Whether a higher value is better.
        runs: Per arm, its runs in the order given.
        stats: What ``stats.json`` holds: per arm the final and best metric (mean, std, 95% CI
            over seeds), step of best, diverged and collapsed counts, time and throughput, and
            ``vs_control`` (difference, bootstrap 95% CI, Welch p-value, verdict).
        commands: Per arm, the commands that reproduce its runs (shown in ``summary.md``).
    """

    metric: str
    control: str
    maximize: bool
    runs: dict[str, list[RunData]]
    stats: dict[str, Any]
    commands: dict[str, list[str]] = field(default_factory=dict)

    def verdicts(self) -> dict[str, str]:
        """``{arm: verdict}`` for every arm but the control."""
        return {arm: s["vs_control"]["verdict"] for arm, s in self.stats["arms"].items()
                if s["vs_control"] is not None}

    def config_differences(self) -> dict[str, dict[str, Any]]:
        """``{dotted key: {arm: value}}`` for every config key whose value differs between arms
        (the arm's value when all its runs agree, else the list of their values)."""
        per_arm: dict[str, dict[str, Any]] = {}
        for arm, runs in self.runs.items():
            flat: dict[str, list[Any]] = {}
            for run in runs:
                for key, value in _flatten(run.config_dict):
                    if key.split(".")[0] not in IGNORED_KEYS:
                        flat.setdefault(key, []).append(value)
            per_arm[arm] = {k: v[0] if all(x == v[0] for x in v) else v for k, v in flat.items()}
        keys = sorted({k for values in per_arm.values() for k in values})
        out = {}
        for key in keys:
            values = {arm: per_arm[arm].get(key) for arm in self.runs}
            if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
                out[key] = values
        return out

    def to_markdown(self) -> str:
        """The summary: the table with the verdicts, the config differences, the commands."""
        from gearshift.report.markdown import comparison_markdown

        return comparison_markdown(self)

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write ``stats.json``, ``summary.md`` and the plots into ``out_dir``; their paths."""
        from gearshift.report.plots import comparison_plots

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stats = json.dumps(json_safe_tree(self.stats), indent=2) + "\n"
        written = [_write_text(out / STATS_FILE, stats)]
        written.extend(comparison_plots(self, out))
        written.append(_write_text(out / SUMMARY_FILE, self.to_markdown()))
        return written


def compare_runs(run_dirs_by_arm: Mapping[str, Sequence[str | Path]], *, metric: str,
                 control: str, maximize: bool = False,
                 collapse_tolerance: float = COLLAPSE_TOLERANCE) -> Comparison:
    """Compare the runs of each arm with those of ``control`` on ``metric``.

    Args:
        run_dirs_by_arm: ``{arm name: [run directory, …]}`` (one per seed).
        metric: A metric of ``metrics.jsonl``, e.g. ``eval/loss``.
        control: The arm the others are compared with (one of the keys).
        maximize: Higher is better (e.g. an accuracy); default lower is better.
        collapse_tolerance: A run whose final value is worse than its best by more than this
            fraction of the best counts as collapsed.

    Returns:
        The :class:`Comparison`; ``.stats`` is ``stats.json``, ``.to_markdown()`` the summary.

    Raises:
        UsageError: When ``control`` is not an arm, an arm has no runs, or no run logged
            ``metric`` (naming the metrics they did log).
        RunDirError: When a directory is not a run directory or a file in it is corrupt.

    Example:
        >>> c = compare_runs({"control": ["runs/a-1", "runs/a-2"], "warmup": ["runs/b-1",
        ...                   "runs/b-2"]}, metric="eval/loss", control="control")  # doctest: +SKIP
        >>> c.verdicts()  # doctest: +SKIP
        {'warmup': 'better'}
    """
    arms = {arm: list(dirs) for arm, dirs in run_dirs_by_arm.items()}
    if control not in arms:
        raise UsageError(f"control arm {control!r} is not one of the arms: "
                         f"{', '.join(arms) or '(none)'}")
    empty = [arm for arm, dirs in arms.items() if not dirs]
    if empty:
        raise UsageError(f"arm(s) {', '.join(empty)} have no runs to compare")
    if not 0 <= collapse_tolerance:
        raise UsageError(f"collapse_tolerance must be >= 0, got {collapse_tolerance}")
    runs = {arm: [load_run(d) for d in dirs] for arm, dirs in arms.items()}
    if not any(r.series(metric) for rs in runs.values() for r in rs):
        logged = sorted({m for rs in runs.values() for r in rs for m in r.metric_names()})
        raise UsageError(f"no run logged the metric {metric!r}; metrics logged: "
                         f"{', '.join(logged) or '(none)'} (set `metric:` to one of them)")
    outcomes = {arm: [run_outcome(r, metric, maximize=maximize,
                                  collapse_tolerance=collapse_tolerance) for r in rs]
                for arm, rs in runs.items()}
    finals = {arm: [o["final"] for o in os_ if o["final"] is not None]
              for arm, os_ in outcomes.items()}
    arm_stats = {}
    for arm, os_ in outcomes.items():
        arm_stats[arm] = {
            "runs": len(os_),
            "final": st.describe(finals[arm]),
            "best": st.describe([o["best"] for o in os_ if o["best"] is not None]),
            "step_of_best": st.describe([float(o["step_of_best"]) for o in os_
                                         if o["step_of_best"] is not None]),
            "diverged": sum(o["diverged"] for o in os_),
            "collapsed": sum(o["collapsed"] for o in os_),
            "missing_metric": sum(o["final"] is None for o in os_),
            "time_s": _mean([o["time_s"] for o in os_]),
            "tokens_per_s": _mean([o["tokens_per_s"] for o in os_]),
            "vs_control": None if arm == control else st.against_control(
                finals[arm], finals[control], maximize=maximize),
            "per_run": os_,
        }
    stats = {"metric": metric, "maximize": maximize, "control": control,
             "collapse_tolerance": collapse_tolerance,
             "method": {"ci95": "Student t over seeds (non-finite finals left out)",
                        "difference": "mean(arm) - mean(control) of the final metric",
                        "difference_ci95": f"percentile bootstrap, {st.BOOTSTRAP_RESAMPLES} "
                                           f"resamples, seed {st.BOOTSTRAP_SEED}",
                        "p_value": "Welch's t-test, two-sided",
                        "verdict": "better/worse when the bootstrap CI excludes 0 and "
                                   f"p < {st.ALPHA}"},
             "arms": arm_stats}
    return Comparison(metric, control, maximize, runs, stats,
                      {arm: [f"gearshift train {r.path / 'config.yaml'}" for r in rs]
                       for arm, rs in runs.items()})


def json_safe_tree(value: Any) -> Any:
    """``value`` with every non-finite float as ``"nan"`` / ``"inf"`` / ``"-inf"`` (JSON has
    none), the way ``metrics.jsonl`` stores them."""
    if isinstance(value, Mapping):
        return {k: json_safe_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe_tree(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
