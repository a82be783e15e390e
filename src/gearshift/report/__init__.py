"""Reports of a run and comparisons of runs: plots, summaries and statistics.

Everything here reads run directories through :mod:`gearshift.rundir` only and never imports
the trainer (``gearshift.train``), so it works on runs that another process is still writing.

Example:
    >>> from gearshift.report import compare_runs, write_report
    >>> write_report("runs/default-20260101-120000")  # doctest: +SKIP
    >>> c = compare_runs({"control": ["runs/c1", "runs/c2"], "warmup": ["runs/w1", "runs/w2"]},
    ...                  metric="eval/loss", control="control")  # doctest: +SKIP
    >>> print(c.to_markdown())  # doctest: +SKIP
"""

from gearshift.report.compare import COLLAPSE_TOLERANCE, Comparison, compare_runs
from gearshift.report.run_report import write_report
from gearshift.report.runs import RunData, load_run

__all__ = ["COLLAPSE_TOLERANCE", "Comparison", "RunData", "compare_runs", "load_run",
           "write_report"]
