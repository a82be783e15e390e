"""``PIPELINE_DIR/report/``: a table of the stages, their loss curves side by side, and each
stage's own report (plots and summary in ``stages/<i>-<name>/report/``).

It reads the pipeline's ``status.json`` (plain JSON) and each stage's run directory through
:mod:`gearshift.rundir`; it never imports the pipeline runner or the trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gearshift import rundir
from gearshift.errors import RunDirError
from gearshift.report.markdown import table
from gearshift.report.run_report import SUMMARY_FILE, write_report
from gearshift.report.runs import RunData, load_run

#: Events counted in the table's "recoveries" column.
RECOVERY_EVENTS = ("oom_recovery", "oom_skip", "nonfinite_skip", "rollback")


def write_pipeline_report(pipeline_dir: str | Path) -> Path:
    """Write every stage's report and ``PIPELINE_DIR/report/summary.md`` (+ ``stages.png``).

    Returns:
        The path of ``summary.md``.

    Raises:
        RunDirError: When ``status.json`` is missing or corrupt.
    """
    root = Path(pipeline_dir)
    status = _read_status(root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows, runs, links = [], [], []
    for entry in status["stages"]:
        run_dir = root / str(entry.get("run_dir"))
        run: RunData | None = None
        if rundir.RunPaths(run_dir).config.is_file():
            run = load_run(run_dir)
            write_report(run_dir)
            runs.append((entry["name"], run))
            links.append(f"- {entry['name']}: [{entry['run_dir']}/report/{SUMMARY_FILE}]"
                         f"(../{entry['run_dir']}/report/{SUMMARY_FILE})")
        m = entry.get("metrics") or {}
        recoveries = sum(len(run.events_of(k)) for k in RECOVERY_EVENTS) if run else None
        output = entry.get("output") or {}
        size = output.get("bytes")
        rows.append([entry["name"], entry.get("task"), entry.get("state"), entry.get("seconds"),
                     entry.get("steps"), m.get("eval/loss"), m.get("eval/exact_match"),
                     m.get("eval/reward"), recoveries,
                     f"{size / 2**20:.2f} MiB ({output.get('kind')})" if size else None])
    plot = _stage_curves(runs, out / "stages.png") if runs else None
    total = sum(e.get("seconds") or 0.0 for e in status["stages"])
    lines = [f"# Pipeline {status.get('name')}", "",
             f"state: {status.get('state')}; stages: {len(status['stages'])}; training time "
             f"(sum of stages): {total:.1f} s", ""]
    if status.get("reason"):
        lines += [f"stopped at stage {status.get('stopped_stage')}: {status['reason']}", ""]
    lines += table(["stage", "task", "state", "time (s)", "steps", "eval loss", "exact match",
                    "reward", "recoveries", "model on disk"], rows)
    if plot is not None:
        lines += ["", f"![loss of each stage]({plot.name})"]
    lines += ["", "## Each stage's report", "", *links, ""]
    summary = out / SUMMARY_FILE
    tmp = summary.with_name(f".{SUMMARY_FILE}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, summary)
    return summary


def _stage_curves(runs: list[tuple[str, RunData]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(runs), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (name, run) in zip(axes, runs, strict=True):
        for metric, style in (("loss", "-"), ("eval/loss", "o-")):
            series = run.series(metric)
            if series:
                ax.plot([s for s, _ in series], [v for _, v in series], style, ms=3,
                        label=metric)
        ax.set_title(f"{name} ({run.config_dict.get('task', 'lm')})", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return path


def _read_status(root: Path) -> dict[str, Any]:
    path = root / "status.json"
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; give a pipeline directory made by `gearshift "
                          "pipeline run`") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(status, dict) or not isinstance(status.get("stages"), list):
        raise RunDirError(f"{path} is not a pipeline status file (no stages list)")
    return status
