"""``gearshift resume RUN_DIR``: continue a run from its newest valid checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from gearshift.cli.train import report_run
from gearshift.config import build_layers, parse_set_overrides, resolve
from gearshift.errors import UsageError
from gearshift.rundir import read_run_config_dict

NAME = "resume"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift resume RUN_DIR [--set …]``."""
    p = sub.add_parser("resume", help="continue a run from its newest valid checkpoint",
                       description="Continue RUN_DIR from its newest checkpoint whose manifest "
                       "verifies (corrupt ones are reported and skipped). The run's own "
                       "config.yaml is used; --set changes it (e.g. a longer run).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the run's config (repeatable)")
    return p


def run(args: argparse.Namespace) -> int:
    """Resume ``args.run_dir`` with its saved config plus ``--set``; the exit code.

    Raises:
        UsageError: If RUN_DIR is not a directory.
        RunDirError: If its config.yaml is missing or empty.
    """
    from gearshift.cli.report_hook import ReportOnEnd
    from gearshift.run import train

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory; give the run directory printed by "
                         "`gearshift train` (e.g. runs/default-20260101-120000)")
    layers = build_layers(read_run_config_dict(run_dir), None)
    if args.sets:
        layers.append(parse_set_overrides(args.sets))
    resolved = resolve(layers)
    hook = ReportOnEnd()
    return report_run(lambda: train(resolved.config, resume=run_dir, audit=resolved.audit,
                                    callbacks=[hook]), hook)
