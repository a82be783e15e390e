"""What the trainer writes into a run directory besides checkpoints: the resolved config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gearshift.config import Config, config_to_yaml
from gearshift.rundir.layout import RunPaths


def write_run_config(run_dir: str | Path, config: Config, audit: dict[str, Any]) -> None:
    """Write ``config.yaml`` and ``overrides.json``; a kill mid-write leaves the old files.

    Args:
        run_dir: The run directory.
        config: The fully resolved config.
        audit: Per dotted key, the value and the layer that set it.
    """
    paths = RunPaths(run_dir)
    _write_atomic(paths.config, config_to_yaml(config))
    _write_atomic(paths.overrides, json.dumps(audit, indent=2, sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
