"""PNG plots of a run and of a comparison, drawn with matplotlib's headless Agg backend.

Figures are made with :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so nothing
opens a window, touches global state or needs a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gearshift.report.runs import MARKED_EVENTS, RunData

if TYPE_CHECKING:
    from gearshift.report.compare import Comparison

#: One colour per kind of marked event on the loss curve.
EVENT_COLOURS = {"oom_recovery": "tab:orange", "oom_skip": "tab:orange",
                 "nonfinite_skip": "tab:red", "diverged": "darkred", "rollback": "tab:purple",
                 "lr_reduced": "tab:olive", "resume": "tab:green", "interrupted": "tab:gray",
                 "fp16_overflow_skip": "tab:pink"}


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing).

    ``weight`` defaults to one that averages over about 5% of the points (at least 0.6);
    non-finite values are carried through without entering the average.

    Example:
        >>> smooth([1.0, 1.0, 1.0])
        [1.0, 1.0, 1.0]
    """
    if weight is None:
        weight = max(0.6, 1 - 1 / max(len(values) / 20, 1))
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = weight * avg + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm > 0 else v)
    return out


def _figure(title: str, ylabel: str, xlabel: str = "step") -> tuple[Figure, object]:
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _xy(series: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [s for s, _ in series], [v for _, v in series]


def _mark_transitions(ax: object, run: RunData) -> None:
    for event in run.events_of("phase_transition"):
        f = event.fields
        ax.axvline(event.step, color="black", linestyle="--", linewidth=0.8)
        ax.annotate(f"{f.get('from_phase')}→{f.get('to_phase')}\n{f.get('reason')}",
                    (event.step, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right")


def run_plots(run: RunData, out: Path) -> list[Path]:
    """Write the plots of one run into ``out``: loss (raw and smoothed, events marked), eval
    metrics, LR, grad norm, and with phases alpha per group and gradient stability with
    every transition marked and labelled with its reason. Only plots with data are written."""
    written = []
    loss = [(s, v) for s, v in run.series("loss")]
    if loss:
        fig, ax = _figure(f"training loss — {run.name}", "loss")
        x, y = _xy(loss)
        ax.plot(x, y, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss")
        ax.plot(x, smooth(y), color="tab:blue", linewidth=1.6, label="smoothed")
        finite = [v for v in y if math.isfinite(v)]
        top = max(finite) if finite else 1.0
        seen: set[str] = set()
        for event in run.events_of(*MARKED_EVENTS):
            colour = EVENT_COLOURS.get(event.kind, "tab:gray")
            ax.axvline(event.step, color=colour, linewidth=0.9, alpha=0.8,
                       label=event.kind if event.kind not in seen else None)
            ax.annotate(event.kind, (event.step, top), fontsize=7, rotation=90, va="top",
                        color=colour)
            seen.add(event.kind)
        _mark_transitions(ax, run)
        ax.legend(loc="upper right", fontsize=8)
        written.append(_save(fig, out / "loss.png"))
    evals = [m for m in run.metric_names() if m.startswith("eval/")]
    if evals:
        fig = Figure(figsize=(8, 3 * len(evals)), dpi=100)
        FigureCanvasAgg(fig)
        for ax, name in zip(fig.subplots(len(evals), 1, squeeze=False)[:, 0], evals,
                            strict=True):
            x, y = _xy(run.series(name))
            ax.plot(x, y, marker="o", markersize=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        written.append(_save(fig, out / "eval.png"))
    for name, label, file in (("lr", "learning rate", "lr.png"),
                              ("grad_norm", "gradient norm (before clipping)", "grad_norm.png")):
        series = run.series(name)
        if series:
            fig, ax = _figure(f"{label} — {run.name}", name)
            ax.plot(*_xy(series))
            _mark_transitions(ax, run)
            written.append(_save(fig, out / file))
    alphas = [m for m in run.metric_names() if m.startswith("alpha/")]
    if alphas:
        fig, ax = _figure(f"LoRA alpha per group — {run.name}", "alpha")
        for name in alphas:
            ax.plot(*_xy(run.series(name)), label=name.removeprefix("alpha/"),
                    drawstyle="steps-post")
        _mark_transitions(ax, run)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "alpha.png"))
    stability = run.series("grad_stability")
    if stability:
        fig, ax = _figure(f"gradient-sign stability — {run.name}", "fraction of signs held")
        x, y = _xy(stability)
        ax.plot(x, y, alpha=0.35, color="tab:green")
        ax.plot(x, smooth(y), color="tab:green")
        _mark_transitions(ax, run)
        written.append(_save(fig, out / "grad_stability.png"))
    return written


def _band(runs: Sequence[RunData], metric: str) -> tuple[list[int], np.ndarray, np.ndarray,
                                                         np.ndarray]:
    """Steps, mean, min and max of ``metric`` over ``runs`` at each step any of them logged."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in run.series(metric):
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    mean = np.array([np.mean(by_step[s]) for s in steps])
    low = np.array([np.min(by_step[s]) for s in steps])
    high = np.array([np.max(by_step[s]) for s in steps])
    return steps, mean, low, high


def comparison_plots(comparison: Comparison, out: Path) -> list[Path]:
    """Write ``metric.png`` (mean per arm, band = min..max over seeds), ``lr.png`` and
    ``final_metric.png`` (a strip plot of each seed's final value per arm) into ``out``."""
    written = []
    arms = list(comparison.runs)
    colours = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    for metric, file, title in ((comparison.metric, "metric.png", comparison.metric),
                                ("lr", "lr.png", "learning rate")):
        fig, ax = _figure(f"{title}: mean over seeds, band = min..max", metric)
        for arm in arms:
            steps, mean, low, high = _band(comparison.runs[arm], metric)
            if not steps:
                continue
            ax.plot(steps, mean, color=colours[arm],
                    label=f"{arm} (n={len(comparison.runs[arm])})")
            ax.fill_between(steps, low, high, color=colours[arm], alpha=0.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        written.append(_save(fig, out / file))
    fig, ax = _figure(f"final {comparison.metric} per arm (one point per seed)",
                      comparison.metric, xlabel="arm")
    rng = np.random.default_rng(0)
    for i, arm in enumerate(arms):
        finals = [o["final"] for o in comparison.stats["arms"][arm]["per_run"]
                  if o["final"] is not None and math.isfinite(o["final"])]
        if finals:
            ax.scatter(i + rng.uniform(-0.08, 0.08, len(finals)), finals, color=colours[arm],
                       zorder=3)
            ax.hlines(np.mean(finals), i - 0.25, i + 0.25, color="black", linewidth=1.5)
    ax.set_xticks(range(len(arms)), arms)
    written.append(_save(fig, out / "final_metric.png"))
    return written
