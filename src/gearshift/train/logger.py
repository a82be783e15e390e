"""Where a run's numbers go: ``metrics.jsonl``, ``events.jsonl``, TensorBoard, Weights & Biases."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from gearshift import rundir
from gearshift.errors import ConfigError, Problem


class RunLogger:
    """Appends metrics and events as JSON lines and mirrors scalars to TensorBoard / W&B.

    Only the main process writes. On resume, :meth:`truncate_after` drops metric lines logged
    after the checkpoint being resumed, so the history reads as if the run had never stopped.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "gearshift", run_name: str = "", enabled: bool = True,
                 purge_step: int | None = None, config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        paths = rundir.RunPaths(run_dir)
        self.metrics_path = paths.metrics
        self.events_path = paths.events
        self._tb = None
        self._wandb = None
        self._write_failed = False
        if not enabled:
            return
        # A run killed mid-write left a torn last line; appending after it would bury it.
        rundir.drop_torn_tail(self.events_path)
        rundir.drop_torn_tail(self.metrics_path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(paths.tensorboard), purge_step=purge_step)
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError:
                raise ConfigError([Problem(
                    "logging.wandb",
                    "Weights & Biases is not installed; pip install 'gearshift[wandb]' "
                    "or set logging.wandb: false")]) from None
            self._wandb = wandb_mod.init(project=wandb_project, name=run_name, config=config,
                                         dir=str(run_dir), resume="allow")

    def truncate_after(self, step: int) -> set[str]:
        """Keep only metric lines with ``step <= step`` (used when resuming).

        Returns the metric names already logged at ``step`` itself, so the caller does not log
        them twice (e.g. the final evaluation of a run killed during its export).
        """
        if not self.enabled:
            return set()
        return rundir.truncate_after(self.metrics_path, step)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(self.metrics_path, {"step": step, **metrics})
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_event(self, step: int, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        self._append(self.events_path, {"step": step, "event": kind, "time": time.time(),
                                        **fields})

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        # A full disk must not kill training from the logger: checkpoints decide (on_error).
        try:
            rundir.append_record(path, record)
        except OSError as exc:
            if not self._write_failed:
                print(f"warning: cannot write {path.name} ({exc.strerror or exc}); records are "
                      "being lost until this is fixed", file=sys.stderr)
            self._write_failed = True

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
