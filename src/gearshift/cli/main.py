"""The ``gearshift`` command: one module per verb, each with its parser and ``run(args)``.

Errors a user can cause (config, data, checkpoint, model, arguments) print one clear message and
exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from gearshift.cli import (
    checkpoint,
    compare,
    config,
    daemon,
    launch,
    model,
    pipeline,
    profile,
    quantize,
    report,
    resume,
    train,
)
from gearshift.errors import GearshiftError

# Verb name -> module with ``add_parser(sub)`` and ``run(args) -> int``, in the order of --help.
VERBS: dict[str, ModuleType] = {m.NAME: m for m in (train, resume, report, compare, config,
                                                     checkpoint, model, profile, quantize,
                                                     daemon, launch, pipeline)}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per verb in :data:`VERBS`."""
    parser = argparse.ArgumentParser(
        prog="gearshift",
        description="Fine-tuning with managed training dynamics: LR schedules that follow the "
                    "clock, LoRA-alpha phases that follow the loss, and runs that survive "
                    "crashes, kills, out-of-memory errors and NaNs (safe checkpoints, exact "
                    "resume).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS.values():
        verb.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the verb, and return its exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from gearshift import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return VERBS[args.command].run(args)
    except GearshiftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\naborted (a second Ctrl-C); the newest checkpoint is intact", file=sys.stderr)
        return 130
