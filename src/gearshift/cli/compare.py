"""``gearshift compare ARMS.yaml [--jobs N]`` or ``gearshift compare RUN_DIR RUN_DIR …``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gearshift.errors import UsageError

if TYPE_CHECKING:
    from gearshift.report import Comparison

NAME = "compare"

DESCRIPTION = """\
Run every arm x seed of ARMS.yaml as a normal run and compare the arms with the
control: final and best metric (mean, std, 95% CI over seeds), diverged and
collapsed counts, the difference to the control with a bootstrap 95% CI and a
Welch t-test, and a verdict (better | worse | no clear difference). Or compare
existing RUN_DIRs, each its own arm."""

EPILOG = """\
study file (ARMS.yaml):
  name: warmup-study
  base: examples/default.yaml        # a config path or an inline config
  seeds: [1, 2, 3]
  arms:
    - {name: control, set: {schedule.name: constant, optim.learning_rate: 0.02}}
    - {name: warmup,  set: {schedule.name: warmup_cosine, schedule.warmup_ratio: 0.1}}
  control: control
  metric: eval/loss                  # lower is better unless `maximize: true`
  # optional: set (keys for every arm), collapse_tolerance (0.1), output_dir (compare)

outputs (compare/<name>-<time>/):
  runs/<arm>-seed<k>/   one normal run directory per arm x seed
  logs/<arm>-seed<k>.log
  report/               stats.json, summary.md, metric.png, lr.png, final_metric.png

Rerunning the same command continues the same folder: finished runs are skipped,
interrupted ones resume from their checkpoints.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift compare``."""
    p = sub.add_parser(
        "compare", help="run arms x seeds from a study file, or compare existing runs",
        description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="ARMS.yaml | RUN_DIR",
                   help="a study file, or two or more run directories")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once, each in its own process with its share of the CPU "
                        "threads (default 1)")
    p.add_argument("--metric", default=None, metavar="NAME",
                   help="with RUN_DIRs: the metric compared (default eval/loss)")
    p.add_argument("--maximize", action="store_true",
                   help="with RUN_DIRs: higher is better")
    p.add_argument("--control", default=None, metavar="ARM",
                   help="with RUN_DIRs: the control (default the first RUN_DIR's name)")
    p.add_argument("--output-dir", default="compare", metavar="DIR",
                   help="with RUN_DIRs: parent of the comparison folder (default compare)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run or read the arms, write ``report/`` and print the verdicts; 0 (1 if a run failed).

    Raises:
        UsageError: For bad arguments.
        ConfigError: For a bad study file or an arm whose config is invalid (every problem of
            every arm, before anything runs).
    """
    if args.jobs < 1:
        raise UsageError(f"--jobs must be 1 or more, got {args.jobs}")
    first = Path(args.inputs[0])
    if len(args.inputs) == 1 and first.suffix in (".yaml", ".yml", ".json"):
        return _study(first, args)
    if first.suffix in (".yaml", ".yml") and first.is_file():
        raise UsageError("give one study file, or two or more run directories, not both")
    return _run_dirs(args)


def _study(path: Path, args: argparse.Namespace) -> int:
    import gearshift.tasks  # noqa: F401  (registers the tasks, whose sections arms may set)
    from gearshift.report.study import Study, execute, load_study

    for flag in ("metric", "control"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} is for RUN_DIRs; a study file sets `{flag}:` itself")
    study = Study(load_study(path), path)
    root = study.folder()
    planned = study.plan(root)  # every arm's config checked before anything runs
    print(f"study: {root} ({len(study.spec.arms)} arms x {len(study.spec.seeds)} seeds, "
          f"--jobs {args.jobs})")
    started = time.perf_counter()
    try:
        outcomes = execute(study, root, planned, jobs=args.jobs)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the running runs checkpointed and stopped; rerun the same "
              f"command to continue {root}", file=sys.stderr)
        return 130
    failed = [o for o in outcomes if o.returncode not in (None, 0, 3)]
    comparison = study.compare(root, planned)
    print(f"time: {time.perf_counter() - started:.0f} s")
    _print_verdicts(comparison, root / "report")
    for o in failed:
        print(f"failed: {o.run.arm}-seed{o.run.seed} (exit {o.returncode}); see {o.run.log}; "
              f"rerun the same command to retry it")
    return 1 if failed else 0


def _run_dirs(args: argparse.Namespace) -> int:
    from gearshift import rundir
    from gearshift.report import compare_runs

    dirs = [Path(p) for p in args.inputs]
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"{d} is not a directory; give run directories (or one study "
                             "file ending in .yaml)")
    if len(dirs) < 2:
        raise UsageError("give two or more run directories to compare (or one study file)")
    arms: dict[str, list[Path]] = {}
    for d in dirs:
        name, n = d.resolve().name, 2
        while name in arms:
            name, n = f"{d.resolve().name}-{n}", n + 1
        arms[name] = [d]
    control = args.control or next(iter(arms))
    comparison = compare_runs(arms, metric=args.metric or "eval/loss", control=control,
                              maximize=args.maximize)
    root = rundir.create_run_dir(args.output_dir, "compare")
    comparison.write(root / rundir.REPORT_DIR)
    _print_verdicts(comparison, root / rundir.REPORT_DIR)
    return 0


def _print_verdicts(comparison: Comparison, report: Path) -> None:
    """One line per arm: its final metric, failures and verdict; then where the report is."""
    s = comparison.stats
    for arm, a in s["arms"].items():
        final = a["final"]["mean"]
        shown = f"{final:.4f}" if final is not None else "-"
        vs = a["vs_control"]
        print(f"{arm}: final {s['metric']} {shown} over {a['final']['n']} run(s), diverged "
              f"{a['diverged']}, collapsed {a['collapsed']}: "
              f"{'(control)' if vs is None else vs['verdict']}")
    print(f"report: {report / 'summary.md'}")
