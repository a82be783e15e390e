"""The pipeline directory, and ``status.json``: where every stage stands.

::

    pipelines/<name>-<YYYYmmdd-HHMMSS>/
      pipeline.yaml          the resolved pipeline: every stage's full config
      status.json            the pipeline's and each stage's state, time, steps, metrics, output
      stages/<i>-<name>/     a normal run directory per stage
      handoff/<i>-<name>.json  what stage i was handed: path, kind, sha256 manifest, validation
      handoff/<i>-<name>/    a merged copy, when stage i needs a full model from an adapter
      report/                the pipeline's summary and each stage's plots
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from gearshift.errors import GearshiftError

PIPELINE_FILE = "pipeline.yaml"
STATUS_FILE = "status.json"
STAGES_DIR = "stages"
HANDOFF_DIR = "handoff"
REPORT_DIR = "report"
STATUS_FORMAT = "gearshift-pipeline"
STATUS_VERSION = 1
#: States of a stage and of the whole pipeline.
STATES = ("pending", "running", "finished", "failed", "interrupted")


class PipelineError(GearshiftError):
    """A pipeline cannot go on: bad directory, a hand-off that changed, a stage that failed.

    Args:
        message: What was wrong and how to fix it.
        exit_code: 2 for what a user can fix (the default), 1 for an unexpected failure.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PipelinePaths:
    """Paths of everything a pipeline directory holds (nothing is created or checked)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.pipeline = self.root / PIPELINE_FILE
        self.status = self.root / STATUS_FILE
        self.stages = self.root / STAGES_DIR
        self.handoffs = self.root / HANDOFF_DIR
        self.report = self.root / REPORT_DIR

    def stage(self, dir_name: str) -> Path:
        """``stages/<i>-<name>``: the stage's run directory."""
        return self.stages / dir_name

    def handoff(self, dir_name: str) -> Path:
        """``handoff/<i>-<name>.json``: what the stage was handed."""
        return self.handoffs / f"{dir_name}.json"

    def merged(self, dir_name: str) -> Path:
        """``handoff/<i>-<name>/``: the merged model the stage starts from (when merged)."""
        return self.handoffs / dir_name


def new_pipeline_dir(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``… if taken); not created."""
    parent = Path(output_dir)
    base = parent / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{base.name}-{n}"
    return candidate


def find_newest_pipeline(output_dir: str | Path, name: str) -> Path | None:
    """The newest ``<name>-*`` pipeline directory under ``output_dir`` (None: none)."""
    parent = Path(output_dir)
    if not parent.is_dir():
        return None
    found = sorted((p for p in parent.glob(f"{name}-*") if (p / STATUS_FILE).is_file()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temp file and ``os.replace`` (readers see old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_yaml_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file, or a :class:`PipelineError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; {what}") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}); {what}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} holds a JSON {type(data).__name__}, not an object; {what}")
    return data


def read_status(pipeline_dir: str | Path) -> dict[str, Any]:
    """``status.json`` of a pipeline directory.

    Raises:
        PipelineError: When the directory is not a pipeline directory or the file is corrupt.
    """
    paths = PipelinePaths(pipeline_dir)
    if not paths.root.is_dir():
        raise PipelineError(f"{paths.root} is not a directory; give the pipeline directory "
                            "printed by `gearshift pipeline run` (e.g. "
                            "pipelines/default-20260101-120000)")
    status = read_json(paths.status, "is this a pipeline directory (made by `gearshift "
                       "pipeline run`)?")
    if status.get("format") != STATUS_FORMAT or not isinstance(status.get("stages"), list):
        raise PipelineError(f"{paths.status} is not a gearshift pipeline status file")
    return status


def read_pipeline_yaml(pipeline_dir: str | Path) -> dict[str, Any]:
    """The resolved ``pipeline.yaml`` of a pipeline directory."""
    path = PipelinePaths(pipeline_dir).pipeline
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; is {path.parent} a pipeline directory?") \
            from None
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{path} cannot be read ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise PipelineError(f"{path} is not a resolved pipeline (no stages list)")
    return data
