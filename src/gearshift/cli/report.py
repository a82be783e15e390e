"""``gearshift report RUN_DIR``: plots and ``summary.md`` of a run, finished or not."""

from __future__ import annotations

import argparse

NAME = "report"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift report RUN_DIR``."""
    p = sub.add_parser(
        "report", help="write RUN_DIR/report/: plots (PNG) and summary.md",
        description="Write RUN_DIR/report/: PNG plots of the training loss (raw and smoothed, "
                    "with OOM / NaN / rollback / resume events marked), eval metrics, LR, grad "
                    "norm and, with phases, LoRA alpha per group and gradient stability with "
                    "each transition and its reason; and summary.md (config highlights, steps, "
                    "time, throughput, best and final eval metrics, transitions, events, peak "
                    "memory). Works on finished, running and interrupted runs. `gearshift "
                    "train` writes it at the end unless report.enabled is false.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. "
                   "runs/default-20260101-120000")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report of ``args.run_dir``; print each file written; 0.

    Raises:
        RunDirError: If RUN_DIR is not a run directory or a file in it is corrupt.
    """
    from gearshift.report import load_run, write_report

    written = write_report(args.run_dir)
    run = load_run(args.run_dir)
    print(f"run: {args.run_dir} ({run.status.state}, step {run.last_step})")
    for path in written:
        print(f"wrote {path}")
    return 0
