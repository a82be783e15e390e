"""Run directories: creation, the resolved config and its audit, finding runs to resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gearshift.config import Config, config_to_yaml, read_config_file, validate


def create_run_dir(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/<name>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``… if taken)."""
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


def write_run_config(run_dir: Path, config: Config, audit: dict[str, Any]) -> None:
    """Write ``config.yaml`` and ``overrides.json``; a kill mid-write leaves the old files."""
    _write_atomic(run_dir / "config.yaml", config_to_yaml(config))
    _write_atomic(run_dir / "overrides.json", json.dumps(audit, indent=2, sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was started with."""
    return validate(read_config_file(Path(run_dir) / "config.yaml"),
                    source=str(Path(run_dir) / "config.yaml"))


def find_auto_resume(output_dir: str | Path, name: str) -> Path | None:
    """The newest run dir named ``<name>-*`` under ``output_dir`` that holds a checkpoint."""
    parent = Path(output_dir)
    if not parent.is_dir():
        return None
    runs = sorted((p for p in parent.glob(f"{name}-*") if (p / "checkpoints").is_dir()),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    return runs[0] if runs else None
