"""The names of everything in a daemon's base directory, and writing small files atomically.

::

    BASE_DIR/
      daemon.yaml          a normal gearshift config plus a ``daemon:`` section
      inbox/               files are dropped here
      processing/          the file being trained (at most one)
      done/                trained files, each with <file>.result.json
      failed/              rejected files, each with <file>.error.json
      current_model        link to the snapshot every new file starts from
      snapshots/           <time>-<file>/ after each file (and <time>-initial/), verified
      runs/                one normal run directory per file
      status/training_status.json
      logs/daemon.log
      daemon.pid           held with a lock while the daemon lives
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gearshift.checkpoint.atomic import fsync_dir
from gearshift.errors import UsageError

CONFIG_FILE = "daemon.yaml"
RESULT_SUFFIX = ".result.json"
ERROR_SUFFIX = ".error.json"


class DaemonPaths:
    """The paths of a daemon's base directory (nothing is created or checked).

    Example:
        >>> DaemonPaths("svc").status.as_posix()
        'svc/status/training_status.json'
    """

    def __init__(self, base: str | Path) -> None:
        self.base = Path(base)
        self.config = self.base / CONFIG_FILE
        self.inbox = self.base / "inbox"
        self.processing = self.base / "processing"
        self.done = self.base / "done"
        self.failed = self.base / "failed"
        self.current_model = self.base / "current_model"
        self.snapshots = self.base / "snapshots"
        self.runs = self.base / "runs"
        self.status = self.base / "status" / "training_status.json"
        self.log = self.base / "logs" / "daemon.log"
        self.pid = self.base / "daemon.pid"
        self.stop_file = self.base / "status" / "stop"

    @property
    def folders(self) -> list[Path]:
        return [self.inbox, self.processing, self.done, self.failed, self.snapshots, self.runs,
                self.status.parent, self.log.parent]

    def create(self) -> None:
        """Create every folder (existing ones are kept)."""
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)

    def require(self) -> None:
        """Raise a UsageError unless ``daemon init`` has set this directory up."""
        if not self.base.is_dir():
            raise UsageError(f"{self.base} does not exist; create it with `gearshift daemon init "
                             f"{self.base}`")
        missing = [p.name for p in [self.config, *self.folders] if not p.exists()]
        if not os.path.lexists(self.current_model):
            missing.append(self.current_model.name)
        if missing:
            raise UsageError(f"{self.base} is not a daemon directory (missing: "
                             f"{', '.join(missing)}); set it up with `gearshift daemon init "
                             f"{self.base}`")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON so that a reader (or a crash) sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def durable_rename(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (same filesystem) and make both folder entries durable."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)
