"""One run directory read for reporting: its config, metrics, events and where it stands.

Everything is read through :mod:`gearshift.rundir`; nothing here imports the trainer, so a
report can be made of a run that another process is still writing.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gearshift import rundir
from gearshift.config import Config
from gearshift.errors import ConfigError, RunDirError

#: Events drawn on the loss curve (recoveries, rollbacks, resumes, stops).
MARKED_EVENTS = ("oom_recovery", "oom_skip", "nonfinite_skip", "rollback", "lr_reduced",
                 "resume", "interrupted", "diverged", "fp16_overflow_skip")
#: Events that say a step's loss or gradient was non-finite (fp16 overflow skips are the loss
#: scaler's normal search, not a divergence).
NONFINITE_EVENTS = ("nonfinite_skip", "rollback")


@dataclass(frozen=True)
class RunData:
    """What a report or a comparison needs from one run directory.

    Attributes:
        path: The run directory.
        config: The validated config, or None when the directory has no ``config.yaml``.
        config_dict: The saved config as written (``{}`` without ``config.yaml``).
        metrics: Every line of ``metrics.jsonl``.
        events: Every line of ``events.jsonl``.
        status: Where the run stands (finished, interrupted, diverged, running).
    """

    path: Path
    config: Config | None
    config_dict: dict[str, Any]
    metrics: list[rundir.MetricRecord]
    events: list[rundir.EventRecord]
    status: rundir.RunStatus

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, name: str) -> list[tuple[int, float]]:
        """``(step, value)`` of metric ``name`` in logging order."""
        return rundir.metric_series(self.metrics, name)

    def metric_names(self) -> list[str]:
        """Every numeric metric the run logged, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.metrics:
            for key in record.values:
                if record.number(key) is not None:
                    seen.setdefault(key, None)
        return list(seen)

    @property
    def last_step(self) -> int:
        """The highest step of any metric or event written so far."""
        return max([self.status.step, *(r.step for r in self.metrics)])

    def events_of(self, *kinds: str) -> list[rundir.EventRecord]:
        return [e for e in self.events if e.kind in kinds]

    @property
    def diverged(self) -> bool:
        """A non-finite loss or eval metric was logged or skipped, or the NaN / OOM guard
        stopped the run.

        A run whose non-finite steps were skipped (``nonfinite_skip``) or rolled back and that
        then trained on to its end counts too: its loss went non-finite all the same.
        """
        if self.status.state == "diverged" or self.events_of(*NONFINITE_EVENTS):
            return True
        return any(v is not None and not math.isfinite(v)
                   for r in self.metrics for k in r.values
                   if k == "loss" or k.startswith("eval/") for v in [r.number(k)])

    @property
    def throughput(self) -> float | None:
        """Median of the logged ``tokens_per_s`` (None when the run logged none)."""
        values = [v for _, v in self.series("tokens_per_s") if math.isfinite(v)]
        return statistics.median(values) if values else None


def load_run(run_dir: str | Path) -> RunData:
    """Read ``run_dir`` for a report or a comparison.

    Raises:
        RunDirError: When ``run_dir`` is not a directory, holds neither ``config.yaml`` nor
            ``metrics.jsonl``, or has a corrupt line (named ``file:line``).
    """
    paths = rundir.RunPaths(run_dir)
    if not paths.root.is_dir():
        raise RunDirError(f"{paths.root} is not a directory; give a run directory, e.g. the one "
                          "printed by `gearshift train` (runs/default-20260101-120000)")
    if not paths.config.is_file() and not paths.metrics.is_file():
        raise RunDirError(f"{paths.root} is not a gearshift run directory: it has neither "
                          f"{rundir.CONFIG_FILE} nor {rundir.METRICS_FILE}")
    config, config_dict = None, {}
    if paths.config.is_file():
        config_dict = rundir.read_run_config_dict(paths.root)
        try:
            config = rundir.read_run_config(paths.root)
        except ConfigError:
            config = None  # e.g. a section of a task this process has not loaded: report anyway
    events = rundir.read_events(paths.root)
    return RunData(paths.root, config, config_dict, rundir.read_metrics(paths.root), events,
                   rundir.run_status(paths.root, events))
