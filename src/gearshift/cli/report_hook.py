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

    The run ends either through :meth:`on_train_end` (finished) or, when it stops early
    (Ctrl-C / SIGTERM, the NaN guard, an error), through :meth:`write` called by whoever caught
    the stop: the report of a stopped run is the one most worth reading. Only the main process
    writes. A report that cannot be written is a warning: ``gearshift report RUN_DIR`` can make
    it later.

    Attributes:
        summary: ``report/summary.md`` once written, else None.
    """

    def __init__(self) -> None:
        self.summary: Path | None = None
        self._run_dir: Path | None = None  # set once the run has started and wants a report

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.config.report.enabled and trainer.is_main and trainer.run_dir is not None:
            self._run_dir = Path(trainer.run_dir)

    def on_train_end(self, trainer: Trainer, result: RunResult) -> None:
        self.write()

    def write(self) -> Path | None:
        """Write the report of the run once it has started (at most once); its summary."""
        if self._run_dir is None or self.summary is not None:
            return self.summary
        try:
            self.summary = write_report(self._run_dir)[-1]
        except (GearshiftError, OSError) as exc:
            print(f"warning: the report could not be written ({exc}); make it later with "
                  f"`gearshift report {self._run_dir}`", file=sys.stderr)
        return self.summary
