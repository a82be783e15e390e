"""``RUN_DIR/report/``: the plots and ``summary.md`` of one run, finished or not."""

from __future__ import annotations

import os
from pathlib import Path

from gearshift import rundir
from gearshift.report.markdown import run_markdown
from gearshift.report.plots import run_plots
from gearshift.report.runs import load_run

SUMMARY_FILE = "summary.md"


def write_report(run_dir: str | Path) -> list[Path]:
    """Write ``run_dir/report/``: PNG plots and ``summary.md``.

    Works on a finished run, on one still training (it reads what has been written so far)
    and on an interrupted, killed or diverged one.

    Args:
        run_dir: A run directory.

    Returns:
        The files written, ``summary.md`` last.

    Raises:
        RunDirError: When ``run_dir`` is not a run directory or a file in it is corrupt.

    Example:
        >>> write_report("runs/default-20260101-120000")  # doctest: +SKIP
        [PosixPath('runs/default-20260101-120000/report/loss.png'), …]
    """
    run = load_run(run_dir)
    out = rundir.RunPaths(run.path).report
    out.mkdir(parents=True, exist_ok=True)
    plots = run_plots(run, out)
    summary = out / SUMMARY_FILE
    tmp = summary.with_name(f".{SUMMARY_FILE}.tmp-{os.getpid()}")
    tmp.write_text(run_markdown(run, [p.name for p in plots]), encoding="utf-8")
    os.replace(tmp, summary)
    return [*plots, summary]
