"""Snapshots: verified copies of each model the daemon produced, and the ``current_model`` link.

A snapshot is written under a temporary name, every file fsynced, a manifest (sha256 and size
of every file) written, everything read back and checked against it, and only then renamed to
``snapshots/<name>/``. ``current_model`` is a symbolic link to one snapshot, swapped with an
atomic rename: a crash at any instant leaves the old model or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gearshift.checkpoint.atomic import fsync_dir, replace_symlink
from gearshift.checkpoint.manifest import sha256_file
from gearshift.daemon.layout import DaemonPaths, write_json_atomic
from gearshift.errors import ModelError, UsageError
from gearshift.models import adapter_base, is_adapter_dir, validate_model_dir

MANIFEST = "snapshot.json"
MANIFEST_FORMAT = "gearshift-snapshot"
TMP_PREFIX = ".tmp-"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_snapshot(source: Path, snapshots: Path, name: str, *, info: dict[str, Any],
                   after_file: Callable[[], None] = lambda: None) -> Path:
    """Copy the model directory ``source`` to ``snapshots/<name>/``, verified.

    An existing, intact ``snapshots/<name>`` (written before a crash) is kept as it is.

    Args:
        source: A valid model or adapter directory (e.g. a run's ``final/``).
        snapshots: The snapshots folder.
        name: The snapshot's name.
        info: Written into the manifest (source file, run, …).
        after_file: Called after each file is copied (the fault drill's pause).

    Raises:
        ModelError: When ``source`` is not a valid model directory or the copy does not verify.
    """
    target = snapshots / name
    if target.is_dir() and not verify_snapshot(target):
        return target
    report = validate_model_dir(source)
    if not report.ok:
        raise ModelError(report.message())
    tmp = snapshots / f"{TMP_PREFIX}{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    files: dict[str, dict[str, Any]] = {}
    for src in _files(source):
        rel = src.relative_to(source)
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(8 << 20):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        files[rel.as_posix()] = {"sha256": digest.hexdigest(), "bytes": dst.stat().st_size}
        after_file()
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "name": name, "kind": report.kind,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "created_ns": time.time_ns(),  # the order of snapshots made within one second
                "files": files, **info}
    write_json_atomic(tmp / MANIFEST, manifest)
    for folder in sorted({p.parent for p in (tmp / f for f in files)} | {tmp}):
        fsync_dir(folder)
    problems = verify_snapshot(tmp)
    if problems:
        raise ModelError(f"snapshot {name} did not verify after writing: {'; '.join(problems)}")
    if target.exists():
        shutil.rmtree(target)  # a damaged earlier copy
    os.replace(tmp, target)
    fsync_dir(snapshots)
    return target


def read_manifest(snapshot: Path) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads((snapshot / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def verify_snapshot(snapshot: Path) -> list[str]:
    """Every problem of a snapshot against its manifest (``[]`` when intact)."""
    manifest = read_manifest(snapshot)
    if manifest is None:
        return [f"{snapshot.name}: {MANIFEST} is missing or unreadable"]
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return [f"{snapshot.name}: {MANIFEST} lists no files"]
    problems = []
    for rel, entry in sorted(listed.items()):
        path = snapshot / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{rel}: not a path inside the snapshot")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel}: size {path.stat().st_size}, manifest {entry.get('bytes')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch")
    extra = {p.relative_to(snapshot).as_posix() for p in _files(snapshot)} - set(listed)
    problems.extend(f"{rel}: present but not in {MANIFEST}" for rel in sorted(extra))
    return problems


def list_snapshots(paths: DaemonPaths) -> list[Path]:
    """The snapshots, oldest first: by the time of writing in their manifest (names start with
    the time to the second only, and several can be made within one second), else the folder's
    mtime."""
    if not paths.snapshots.is_dir():
        return []

    def written(p: Path) -> tuple[int, str]:
        manifest = read_manifest(p) or {}
        ns = manifest.get("created_ns")
        return (ns if isinstance(ns, int) else p.stat().st_mtime_ns, p.name)

    return sorted((p for p in paths.snapshots.iterdir()
                   if p.is_dir() and not p.name.startswith(".")), key=written)


def current_snapshot(paths: DaemonPaths) -> Path | None:
    """The snapshot ``current_model`` links to (None when there is no link)."""
    try:
        target = os.readlink(paths.current_model)
    except OSError:
        return None
    return (paths.base / target) if not os.path.isabs(target) else Path(target)


def switch_current(paths: DaemonPaths, snapshot: Path) -> None:
    """Point ``current_model`` at ``snapshot`` atomically (a relative link: the base directory
    can move)."""
    replace_symlink(paths.current_model, os.path.relpath(snapshot, paths.base))


def _base_snapshot(paths: DaemonPaths, snapshot: Path) -> Path | None:
    """The snapshot holding an adapter snapshot's base model, if its base lives in one."""
    if not is_adapter_dir(snapshot):
        return None
    try:
        base = adapter_base(snapshot).resolve()
    except ModelError:
        return None
    root = paths.snapshots.resolve()
    if root in base.parents:
        return paths.snapshots / base.relative_to(root).parts[0]
    return None


def prune(paths: DaemonPaths, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` snapshots; never the current one, nor a snapshot a
    kept adapter uses as its base. Returns what was removed."""
    found = list_snapshots(paths)
    kept = set(found[-keep:])
    current = current_snapshot(paths)
    if current is not None:
        kept.add(paths.snapshots / current.name)
    for snap in list(kept):
        base = _base_snapshot(paths, snap)
        while base is not None and base not in kept:
            kept.add(base)
            base = _base_snapshot(paths, base)
    removed = [s for s in found if s not in kept]
    for snap in removed:
        shutil.rmtree(snap, ignore_errors=True)
    for tmp in paths.snapshots.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if removed:
        fsync_dir(paths.snapshots)
    return removed


def rollback(paths: DaemonPaths, name: str) -> Path:
    """Make the snapshot ``name`` the current model (the daemon must be stopped).

    Raises:
        UsageError: When there is no such snapshot, naming the ones there are.
        ModelError: When it does not verify or is not a valid model directory.
    """
    snap = paths.snapshots / Path(name).name
    if not snap.is_dir() or name.startswith("."):
        names = ", ".join(p.name for p in list_snapshots(paths)) or "none"
        raise UsageError(f"no snapshot {name!r} in {paths.snapshots}; snapshots: {names}")
    problems = verify_snapshot(snap)
    if problems:
        raise ModelError(f"snapshot {snap} is damaged and cannot become the current model: "
                         f"{'; '.join(problems[:5])}")
    report = validate_model_dir(snap)
    if not report.ok:
        raise ModelError(report.message())
    switch_current(paths, snap)
    return snap


__all__ = ["MANIFEST", "current_snapshot", "list_snapshots", "prune",
           "read_manifest", "rollback", "switch_current", "verify_snapshot", "write_snapshot"]
