"""Names of the files in a run directory, creating one, and finding the run to resume.

A run directory looks like this (see DESIGN.md)::

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml          the fully resolved config
      overrides.json       where each non-default value came from
      metrics.jsonl        one JSON object per logged step
      events.jsonl         phase transitions, recoveries, checkpoints, resumes
      samples.jsonl        generated answers at evaluations (prompt, completion, reference)
      tensorboard/
      checkpoints/step-XXXXXXXX/ and checkpoints/latest -> step-…
      final/               the exported model or adapter
      report/              plots and summary
"""

from __future__ import annotations

import time
from pathlib import Path

from gearshift.checkpoint.layout import LATEST_LINK, step_dir_name

CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.json"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
REPORT_DIR = "report"


class RunPaths:
    """The paths of everything a run directory holds (nothing is created or checked).

    Args:
        root: The run directory.

    Attributes:
        root: The run directory.
        config: ``config.yaml``, the fully resolved config.
        overrides: ``overrides.json``, where each non-default config value came from.
        metrics: ``metrics.jsonl``, one JSON object per logged step.
        events: ``events.jsonl``, one JSON object per event.
        samples: ``samples.jsonl``, answers generated at evaluations (step, prompt,
            completion, reference, score).
        tensorboard: ``tensorboard/``, the TensorBoard event files.
        checkpoints: ``checkpoints/``, the ``step-XXXXXXXX`` folders and the ``latest`` link.
        latest: ``checkpoints/latest``, the link to the newest checkpoint.
        final: ``final/``, the exported model or adapter directory.
        report: ``report/``, plots and the summary.

    Example:
        >>> RunPaths("runs/tiny-20260101-120000").checkpoint(200).name
        'step-00000200'
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / CONFIG_FILE
        self.overrides = self.root / OVERRIDES_FILE
        self.metrics = self.root / METRICS_FILE
        self.events = self.root / EVENTS_FILE
        self.samples = self.root / SAMPLES_FILE
        self.tensorboard = self.root / TENSORBOARD_DIR
        self.checkpoints = self.root / CHECKPOINTS_DIR
        self.latest = self.checkpoints / LATEST_LINK
        self.final = self.root / FINAL_DIR
        self.report = self.root / REPORT_DIR

    def checkpoint(self, step: int) -> Path:
        """``checkpoints/step-XXXXXXXX`` for ``step`` (zero-padded to 8 digits)."""
        return self.checkpoints / step_dir_name(step)


def create_run_dir(output_dir: str | Path, name: str) -> Path:
    """Create ``<output_dir>/<name>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``… if taken).

    Args:
        output_dir: The parent of run directories (created if missing).
        name: The run's name (``config.name``).

    Returns:
        The new, empty run directory.
    """
    parent = Path(output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = parent / f"{name}-{stamp}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = parent / f"{base.name}-{n}"


def find_auto_resume(output_dir: str | Path, name: str) -> Path | None:
    """Return the newest run directory named ``<name>-*`` under ``output_dir`` with checkpoints.

    Args:
        output_dir: The parent of run directories.
        name: The run's name (``config.name``).

    Returns:
        The most recently modified matching run directory, or None when there is none.
    """
    parent = Path(output_dir)
    if not parent.is_dir():
        return None
    runs = sorted((p for p in parent.glob(f"{name}-*") if RunPaths(p).checkpoints.is_dir()),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    return runs[0] if runs else None
