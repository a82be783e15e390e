"""JSON-lines files of a run (``metrics.jsonl``, ``events.jsonl``): append, read, truncate.

A run killed mid-write leaves at most one torn line, the last one, with no newline after it:
readers skip it, and the next writer cuts it off before appending so that it never ends up in
the middle of the file. Any other line that does not parse is corruption and is reported with
its file and line number.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gearshift.errors import RunDirError

# JSON has no NaN or infinity; writers store them as these strings and readers turn them back.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def json_safe(value: Any) -> Any:
    """Return ``value`` with a non-finite float replaced by ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def decode_value(value: Any) -> Any:
    """Undo :func:`json_safe`: ``"nan"``/``"inf"``/``"-inf"`` become floats again."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line (non-finite floats as strings).

    Raises:
        OSError: When the file cannot be written (the caller decides whether that is fatal).
    """
    line = json.dumps({k: json_safe(v) for k, v in record.items()}) + "\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(line)


def drop_torn_tail(path: Path) -> bool:
    """Cut off a last line that has no newline (left by a killed writer).

    Call once before a new process appends, so the torn line is not glued to the next record.

    Returns:
        True when something was cut off.
    """
    try:
        with path.open("rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return False
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return False
            f.seek(0)
            keep = f.read().rfind(b"\n") + 1
            f.truncate(keep)
            return True
    except OSError:
        return False  # best effort: a file that cannot be written is reported by its writer


def iter_records(path: Path, *, strict: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each JSON object in ``path`` (a missing file: none).

    Args:
        path: A ``.jsonl`` file.
        strict: Raise on a corrupt line before the last; when False, skip every line that does
            not parse (what resuming does: it rewrites the file anyway).

    Raises:
        RunDirError: With ``strict``, for a line that is not a JSON object with an integer
            ``step``, naming ``file:line``.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = text.split("\n")
    # The element after the last newline is "" for a complete file, else the torn tail.
    torn = len(lines) - 1 if lines[-1] else None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else "not a JSON object"
        except json.JSONDecodeError as exc:
            record, problem = None, f"not valid JSON ({exc.msg} at column {exc.colno})"
        if problem is None and (isinstance(record.get("step"), bool)
                                or not isinstance(record.get("step"), int)):
            problem = "no integer 'step'"
        if problem is None:
            yield number, record
        elif strict and number - 1 != torn:
            raise RunDirError(f"{path}:{number}: {problem}; the file is corrupt: fix or delete "
                              "that line")


def truncate_after(path: Path, step: int) -> set[str]:
    """Keep only the records with ``step <= step`` (used when resuming); rewrite atomically.

    Lines that do not parse are dropped: the file being rewritten is the run's own, and a
    resumed run continues as if it had never stopped.

    Returns:
        The names already recorded at ``step`` itself, so the caller does not log them twice
        (e.g. the final evaluation of a run killed during its export).
    """
    at_step: set[str] = set()
    if not path.exists():
        return at_step
    kept = []
    for _, record in iter_records(path, strict=False):
        if record["step"] <= step:
            kept.append(json.dumps(record))
        if record["step"] == step:
            at_step.update(record)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    tmp.replace(path)
    return at_step
