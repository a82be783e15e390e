"""Judging a dropped file before training, and the record of why a file was rejected."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gearshift.config import Config
from gearshift.daemon.status import now_iso
from gearshift.errors import DataError

#: A bad line in a DataError message: ``<path>:<line>: <reason>``.
_WHERE = re.compile(r"(?P<path>[^\s:][^:]*):(?P<line>\d+): ")


def check_file(file: Path, config: Config, min_examples: int) -> int:
    """The number of usable examples in ``file``, read as the run will read it.

    Raises:
        DataError: When it is empty, not JSONL, has a bad line (with ``data.on_error: error``,
            naming ``file:line``) or fewer than ``min_examples`` usable examples.
    """
    d = config.data
    if config.task == "sft":
        from gearshift.data.chat import load_conversations

        n = len(load_conversations([file], messages_field=d.messages_field,
                                   on_error=d.on_error).conversations)
    else:
        from gearshift.data import load_corpus

        n = len(load_corpus("jsonl", [str(file)], text_field=d.text_field,
                            messages_field=d.messages_field, on_error=d.on_error).documents)
    if n < min_examples:
        raise DataError(f"{file}: {n} usable example{'s' if n != 1 else ''}, fewer than "
                        f"daemon.min_examples={min_examples}")
    return n


def error_record(file: Path, name: str, exc: Exception, run_dir: Path) -> dict[str, Any]:
    """``<file>.error.json``: the reason (paths shown as the file's name), ``file:line`` when
    the error names a line of the file, the kind of error and the run."""
    text = str(exc).replace(str(file.resolve()), name).replace(str(file), name)
    line = None
    for m in _WHERE.finditer(text):
        if Path(m.group("path")).name == name:
            line = int(m.group("line"))
            break
    return {"file": name, "reason": text, "line": line,
            "location": f"{name}:{line}" if line else name, "kind": type(exc).__name__,
            "run": str(run_dir), "time": now_iso()}
