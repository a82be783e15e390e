"""The report at the end of ``gearshift train`` / ``resume``: a callback, not a branch in the loop.

Imported only when a run starts (it subclasses the trainer's :class:`~gearshift.train.Callback`),
so the other verbs never load the trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gearshift.errors import GearshiftError
from gearshift.report import write_report
from gearshift.train import Callback

if TYPE_CHECKING:
    from gearshift.train import RunResult, Trainer


class ReportOnEnd(Callback):
    """Writes ``RUN_DIR/report/`` when the run ends, unless ``report.enabled: false``.

    Only the main process writes. A report that cannot be written is a warning: the run itself
    has succeeded (``gearshift report RUN_DIR`` can make it later).

    Attributes:
        summary: ``report/summary.md`` once written, else None.
    """

    def __init__(self) -> None:
        self.summary: Path | None = None

    def on_train_end(self, trainer: Trainer, result: RunResult) -> None:
        if not trainer.config.report.enabled or not trainer.is_main:
            return
        try:
            self.summary = write_report(result.run_dir)[-1]
        except (GearshiftError, OSError) as exc:
            print(f"warning: the report could not be written ({exc}); make it later with "
                  f"`gearshift report {result.run_dir}`", file=sys.stderr)
