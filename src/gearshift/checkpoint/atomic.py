"""Durable filesystem steps: fsync files and folders, write JSON, swap a symlink atomically.

A rename is only crash-safe once the renamed data and the folder entry are both on disk, hence
the explicit fsyncs: without them a power cut can leave a renamed folder whose files are empty.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gearshift.checkpoint.layout import make_temp_name


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk (the file may have been written by another library)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    if os.name != "posix":
        return  # Folders cannot be opened for fsync on Windows; renames are durable there.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_json(obj: Mapping[str, Any], what: str) -> bytes:
    """Serialize ``obj`` as strict JSON (no NaN/Infinity), or raise ValueError naming ``what``."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} is not JSON-serializable ({exc}); store only dicts, lists, str, int, "
            "finite float, bool and None"
        ) from exc
    return (text + "\n").encode("utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it before returning."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative) so that readers see the old or new link, never none.

    A new link is created under a temporary name and renamed over the old one; ``os.replace`` is
    atomic on POSIX.
    """
    tmp = link.parent / make_temp_name("tmp", "latest")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def pid_alive(pid: int) -> bool:
    """Return whether a process with this id exists (conservatively True where unknown)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) sends a console event on Windows; never risk it.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # It exists but belongs to another user.
    except OSError:
        return True
    return True
