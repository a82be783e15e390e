"""The ``summary.md`` of a run and of a comparison."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gearshift.report.runs import MARKED_EVENTS, RunData

if TYPE_CHECKING:
    from gearshift.report.compare import Comparison

STATE_WORDS = {"finished": "finished",
               "interrupted": "interrupted (Ctrl-C / SIGTERM); resume with `gearshift resume`",
               "diverged": "diverged (stopped by the NaN / out-of-memory guard)",
               "running": "in progress, or killed (no closing event yet)"}


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: ``-`` for None, ``nan`` / ``inf`` as such, else ``digits``
    significant figures.

    Example:
        >>> fmt(0.123456), fmt(None), fmt(float("nan")), fmt(12)
        ('0.1235', '-', 'nan', '12')
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table (``|`` in cells escaped)."""
    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def _highlights(run: RunData) -> list[tuple[str, Any]]:
    c = run.config
    if c is None:
        return [("config", "no config.yaml in the run directory")]
    b = c.model.build
    model = c.model.path or (f"llama built: hidden {b.hidden_size}, layers "
                             f"{b.num_hidden_layers}, heads {b.num_attention_heads}")
    s = c.schedule
    warmup = next((f"{k} {getattr(s, k)}" for k in ("warmup_steps", "warmup_ratio",
                                                    "warmup_epochs")
                   if getattr(s, k) is not None), "none")
    rows: list[tuple[str, Any]] = [
        ("task", c.task), ("model", model), ("data", f"{c.data.source}, seq_len {c.data.seq_len}"),
        ("optimizer", f"{c.optim.name}, lr {c.optim.learning_rate:g}, weight decay "
                      f"{c.optim.weight_decay:g}"),
        ("schedule", f"{s.name}, warmup {warmup}, min_lr_ratio {s.min_lr_ratio:g}"),
        ("batch", f"{c.training.batch_size} x {c.training.accumulate_grad_batches} "
                  f"accumulation, precision {c.training.precision}, grad clip "
                  f"{c.training.grad_clip}"),
        ("length", f"max_steps {c.training.max_steps}" if c.training.max_steps
         else f"{c.training.epochs} epochs"),
        ("seed", c.seed)]
    if c.lora.enabled:
        rows.append(("lora", f"r {c.lora.r}, alpha {c.lora.alpha:g}"))
    rows.append(("phases", "on" if c.phases and c.phases.get("enabled", True) else "off"))
    return rows


def _time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def run_markdown(run: RunData, plots: Sequence[str]) -> str:
    """The ``summary.md`` of one run."""
    st = run.status
    lines = [f"# Run report: {run.name}", "", f"- status: {STATE_WORDS[st.state]}",
             f"- steps: {run.last_step}" + (f" of {st.total_steps}" if st.total_steps else "")
             + (f" ({st.resumes} resume{'s' if st.resumes != 1 else ''})" if st.resumes else ""),
             f"- time: {_time(st.active_seconds)} of training (summed over segments)",
             f"- throughput: {fmt(run.throughput, 5)} tokens/s (median of logged intervals)",
             f"- peak memory: {fmt(st.peak_memory_mb, 5)} MiB" if st.peak_memory_mb is not None
             else "- peak memory: - (not recorded yet)", "", "## Config highlights", ""]
    lines += table(["key", "value"], _highlights(run))
    evals = [m for m in run.metric_names() if m.startswith("eval/")]
    lines += ["", "## Eval metrics", ""]
    if evals:
        rows = []
        for name in evals:
            series = run.series(name)
            finite = [(s, v) for s, v in series if math.isfinite(v)]
            pick = max if name.endswith(("acc", "accuracy", "reward", "exact_match")) else min
            best = pick(finite, key=lambda sv: sv[1]) if finite else (None, None)
            rows.append([name, series[0][1], series[-1][1], series[-1][0], best[1], best[0]])
        lines += table(["metric", "first", "final", "final step", "best", "best step"], rows)
    else:
        lines.append("No evaluation logged yet.")
    loss = run.series("loss")
    if loss:
        lines += ["", f"Training loss: first {fmt(loss[0][1])} (step {loss[0][0]}), last "
                  f"{fmt(loss[-1][1])} (step {loss[-1][0]})."]
    moves = run.events_of("phase_transition")
    lines += ["", "## Phase transitions", ""]
    if moves:
        lines += table(["step", "from", "to", "alpha", "steps in phase", "reason"],
                       [[e.step, e.fields.get("from_phase"), e.fields.get("to_phase"),
                         f"{fmt(e.fields.get('from_alpha'))} -> {fmt(e.fields.get('to_alpha'))}",
                         e.fields.get("steps_in_phase"), e.fields.get("reason")]
                        for e in moves])
    else:
        lines.append("None." if run.config is None or not run.config.phases
                     else "None yet.")
    marked = run.events_of(*MARKED_EVENTS)
    lines += ["", "## Events", ""]
    if marked:
        lines += table(["step", "event", "details"],
                       [[e.step, e.kind, _details(e.fields)] for e in marked])
    else:
        lines.append("No recoveries, rollbacks, resumes or stops.")
    if plots:
        lines += ["", "## Plots", "", *(f"![{p}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


def _details(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        text = fmt(value) if isinstance(value, int | float | None) else (
            value if isinstance(value, str) else json.dumps(value))
        parts.append(f"{key}={text[:120]}")
    return ", ".join(parts)


def _mean_ci(d: dict[str, Any]) -> str:
    if d["mean"] is None:
        return "-"
    if d["ci95"] is None:
        return f"{fmt(d['mean'])} (n={d['n']})"
    return f"{fmt(d['mean'])} ± {fmt(d['std'], 2)} [{fmt(d['ci95'][0])}, {fmt(d['ci95'][1])}]"


def comparison_markdown(c: Comparison) -> str:
    """The ``summary.md`` of a comparison: the table with the verdicts, the config differences
    between arms, and the commands that reproduce each arm."""
    better = "higher" if c.maximize else "lower"
    lines = [f"# Comparison on {c.metric} ({better} is better), control: {c.control}", ""]
    rows = []
    for arm, s in c.stats["arms"].items():
        vs = s["vs_control"]
        rows.append([arm, s["runs"], _mean_ci(s["final"]), _mean_ci(s["best"]),
                     fmt(s["step_of_best"]["mean"], 4), s["diverged"], s["collapsed"],
                     "-" if vs is None else fmt(vs["difference"]),
                     "-" if vs is None or vs["ci95"] is None
                     else f"[{fmt(vs['ci95'][0])}, {fmt(vs['ci95'][1])}]",
                     "-" if vs is None else fmt(vs["p_value"], 3),
                     "(control)" if vs is None else vs["verdict"]])
    lines += table(["arm", "runs", f"final {c.metric} mean ± std [95% CI]", "best",
                    "step of best", "diverged", "collapsed", "diff vs control",
                    "diff 95% CI (bootstrap)", "Welch p", "verdict"], rows)
    lines += ["", f"Collapsed: final value worse than the run's best by more than "
              f"{c.stats['collapse_tolerance']:.0%}. Diverged: non-finite loss or stopped by "
              "the NaN guard. Verdict: better / worse only when the bootstrap CI of the "
              "difference excludes 0 and Welch's p < 0.05.", ""]
    lines += table(["arm", "mean time", "mean tokens/s"],
                   [[arm, None if s["time_s"] is None else f"{s['time_s']:.1f} s",
                     s["tokens_per_s"]] for arm, s in c.stats["arms"].items()])
    lines += ["", "## Runs", ""]
    lines += table(["arm", "run", "state", "steps", "final", "best", "step of best",
                    "diverged", "collapsed"],
                   [[arm, o["run"], o["state"], o["steps"], o["final"], o["best"],
                     o["step_of_best"], o["diverged"], o["collapsed"]]
                    for arm, s in c.stats["arms"].items() for o in s["per_run"]])
    diffs = c.config_differences()
    lines += ["", "## Config differences between arms", ""]
    if diffs:
        arms = list(c.runs)
        lines += table(["key", *arms], [[k, *(json.dumps(v[a]) for a in arms)]
                                        for k, v in diffs.items()])
    else:
        lines.append("None (the arms differ only in seed, name or output directory).")
    lines += ["", "## Reproduce", ""]
    for arm, commands in c.commands.items():
        lines += [f"{arm}:", "", "```bash", *commands, "```", ""]
    lines += ["## Plots", "", "![metric](metric.png)", "![lr](lr.png)",
              "![final metric](final_metric.png)"]
    return "\n".join(lines) + "\n"
