"""The manifest: sha256 and size of every file of a checkpoint, and the check against it.

Files are verified in parallel threads (reading and hashing both release the GIL). The format is
unchanged since version 1, so every checkpoint ever written still verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gearshift.checkpoint.layout import MANIFEST_FILE, parse_step_dir

MANIFEST_FORMAT = "gearshift-checkpoint"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20
_VERIFY_WORKERS = max(1, min(4, os.cpu_count() or 1))


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_for(step: int, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a checkpoint whose files' sha256 and size are ``files`` (by name)."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": dict(sorted(files.items())),
    }


def read_manifest(path: str | Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Read and shape-check ``manifest.json`` of a checkpoint.

    Returns:
        ``(manifest, problems)``; ``manifest`` is None when it cannot be used at all.
    """
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file():
        return None, [f"{MANIFEST_FILE}: missing"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{MANIFEST_FILE}: unreadable or not valid JSON ({exc})"]
    if not isinstance(manifest, dict):
        return None, [f"{MANIFEST_FILE}: expected a JSON object"]
    problems: list[str] = []
    if manifest.get("format") != MANIFEST_FORMAT:
        problems.append(
            f"{MANIFEST_FILE}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        )
    if manifest.get("version") != MANIFEST_VERSION:
        problems.append(
            f"{MANIFEST_FILE}: version {manifest.get('version')!r} is not supported "
            f"(this gearshift reads version {MANIFEST_VERSION})"
        )
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        problems.append(f"{MANIFEST_FILE}: step {step!r} is not a non-negative int")
    files = manifest.get("files")
    if not isinstance(files, dict):
        problems.append(f"{MANIFEST_FILE}: 'files' is not an object")
    if problems:
        return None, problems
    return manifest, []


def verify_checkpoint(path: str | Path) -> list[str]:
    """Check a checkpoint folder against its manifest.

    Every listed file must exist with the listed size and sha256, and every file in the folder
    must be listed. Nothing is loaded or changed.

    Args:
        path: The checkpoint folder (e.g. ``run/checkpoints/step-00000200``).

    Returns:
        One message per problem, each starting with the file it is about; ``[]`` when the
        checkpoint is intact.

    Example:
        >>> verify_checkpoint("runs/x/checkpoints/step-00000200")  # doctest: +SKIP
        []
    """
    directory = Path(path)
    if not directory.is_dir():
        return [f"{directory}: not a checkpoint folder (missing or not a directory)"]
    manifest, problems = read_manifest(directory)
    if manifest is None:
        return problems
    dir_step = parse_step_dir(directory.name)
    if dir_step is not None and dir_step != manifest["step"]:
        problems.append(
            f"{MANIFEST_FILE}: step {manifest['step']} does not match folder name {directory.name}"
        )
    listed: dict[str, Any] = manifest["files"]
    entries = sorted(listed.items())
    with ThreadPoolExecutor(max_workers=_VERIFY_WORKERS, thread_name_prefix="gs-verify") as pool:
        for found in pool.map(lambda item: _check_entry(directory, *item), entries):
            problems.extend(found)
    for child in sorted(directory.iterdir()):
        if child.name != MANIFEST_FILE and child.name not in listed:
            problems.append(f"{child.name}: present but not listed in {MANIFEST_FILE}")
    return problems


def _check_entry(directory: Path, name: str, entry: Any) -> list[str]:
    # A manifest is untrusted input: a name with a separator could point outside the folder.
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return [f"{MANIFEST_FILE}: file name {name!r} is not a plain file name"]
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return [f"{name}: manifest entry has no sha256"]
    expected_bytes = entry.get("bytes")
    file_path = directory / name
    if not file_path.is_file():
        return [f"{name}: missing (listed in {MANIFEST_FILE})"]
    size = file_path.stat().st_size
    if size != expected_bytes:
        return [f"{name}: size is {size} bytes, {MANIFEST_FILE} says {expected_bytes}"]
    actual = sha256_file(file_path)
    if actual != entry["sha256"]:
        return [
            f"{name}: sha256 mismatch (file {actual[:12]}..., {MANIFEST_FILE} {entry['sha256'][:12]}...)"
        ]
    return []
