"""The record of one file's trip through the daemon: ``runs/<name>/daemon_job.json``.

It is written when the file is taken and at every stage after (``training`` → ``trained`` →
``switched`` → ``done``, or ``training`` → ``failed`` → ``done``: ``done`` means the file has
left ``processing/``), so a restarted daemon knows where each file in
``processing/`` stands: still training (resume its run), trained (write the snapshot, switch,
move to ``done/``) or switched (only the move is left). A file is never trained twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gearshift.checkpoint.manifest import sha256_file
from gearshift.daemon.layout import DaemonPaths, write_json_atomic

JOB_FILE = "daemon_job.json"
STAGES = ("training", "trained", "switched", "done", "failed")


@dataclass
class Job:
    """One file's job.

    Attributes:
        file: The file's name in ``processing/``.
        name: The run's and the snapshot's name (``<time>-<file stem>``).
        final_name: The file's name in ``done/`` or ``failed/`` (its own, unless taken).
        sha256: The file's content hash when it was taken.
        taken_at: When it was taken (ISO time).
        start_model: The snapshot the run starts from.
        config: The run's fully resolved config (so a resume trains on the same settings).
        stage: Where it stands (:data:`STAGES`).
        result: Filled in once trained (steps, metrics, time, peak memory).
    """

    file: str
    name: str
    final_name: str
    sha256: str
    taken_at: str
    start_model: str
    config: dict[str, Any]
    stage: str = "training"
    result: dict[str, Any] = field(default_factory=dict)

    def run_dir(self, paths: DaemonPaths) -> Path:
        return paths.runs / self.name

    def save(self, paths: DaemonPaths) -> None:
        folder = self.run_dir(paths)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / JOB_FILE, asdict(self))

    def advance(self, paths: DaemonPaths, stage: str, **result: Any) -> None:
        self.stage = stage
        self.result.update(result)
        self.save(paths)


def read_job(path: Path) -> Job | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Job(**data)
    except (OSError, ValueError, TypeError):
        return None


def all_jobs(paths: DaemonPaths) -> list[Job]:
    """Every readable job record, oldest first."""
    found = [read_job(p) for p in sorted(paths.runs.glob(f"*/{JOB_FILE}"))]
    return sorted((j for j in found if j is not None), key=lambda j: (j.taken_at, j.name))


def find_open_job(paths: DaemonPaths, file: Path) -> Job | None:
    """The unfinished job of the file in ``processing/`` (same name and content), if any."""
    digest = sha256_file(file)
    open_jobs = [j for j in all_jobs(paths)
                 if j.file == file.name and j.sha256 == digest and j.stage != "done"]
    return open_jobs[-1] if open_jobs else None


def new_name(paths: DaemonPaths, file: Path) -> str:
    """A fresh ``<time>-<stem>`` for a run and its snapshot (``-2``… when taken)."""
    stem = file.name.split(".")[0] or "file"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"
    name, n = base, 1
    while (paths.runs / name).exists() or (paths.snapshots / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def final_name(paths: DaemonPaths, file: Path, name: str) -> str:
    """The file's name in ``done/`` / ``failed/``: its own, or prefixed by the job's time when
    a file of that name was handled before."""
    taken = {p.name for folder in (paths.done, paths.failed) for p in folder.iterdir()}
    return file.name if file.name not in taken else f"{name[:15]}-{file.name}"
