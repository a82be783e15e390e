"""Names on disk: checkpoint folders, the files inside them and the temporary names used while
writing.

One checkpoint is ``<run_dir>/checkpoints/step-00000200/``. Everything a writer creates before it
is complete starts with a dot, so a listing of ``step-*`` folders never sees it::

    .tmp-step-00000200-<pid>-<hex>/   a checkpoint being written
    .old-step-00000200-<pid>-<hex>/   the previous copy of a step that is being saved again
    .del-step-00000100-<pid>-<hex>/   a checkpoint being deleted by retention
    .tmp-latest-<pid>-<hex>           the new ``latest`` link before it replaces the old one
"""

from __future__ import annotations

import numbers
import os
import re
import secrets
from dataclasses import dataclass

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_LAYOUT_FILE = "optimizer.json"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
LATEST_LINK = "latest"

# Names a caller may not use for ``extra_json`` because the checkpoint itself uses them.
RESERVED_JSON_NAMES = frozenset({"optimizer", "trainer_state", "manifest"})
_EXTRA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")

_STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")
_TEMP_RE = re.compile(r"^\.(tmp|old|del)-(step-\d{8,}|latest)-(\d+)-([0-9a-f]+)$")


def step_dir_name(step: int) -> str:
    """Return the folder name of the checkpoint for ``step``.

    Args:
        step: The optimizer step the checkpoint was taken at (a non-negative int).

    Returns:
        ``"step-"`` followed by the step zero-padded to 8 digits, e.g. ``"step-00000200"``.

    Raises:
        ValueError: If ``step`` is not a non-negative int.

    Example:
        >>> step_dir_name(200)
        'step-00000200'
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"step-{int(step):08d}"


def parse_step_dir(name: str) -> int | None:
    """Return the step encoded in a checkpoint folder name, or None if it is not one."""
    match = _STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


def check_extra_name(name: str) -> None:
    """Raise ValueError unless ``name`` can be used as ``<name>.json`` inside a checkpoint."""
    if not isinstance(name, str) or not _EXTRA_NAME_RE.match(name):
        raise ValueError(
            f"extra_json name {name!r} is not usable as a file name: use letters, digits, "
            "'_' and '-' only (it becomes <name>.json)"
        )
    if name in RESERVED_JSON_NAMES:
        raise ValueError(
            f"extra_json name {name!r} is used by the checkpoint itself; choose another name"
        )


@dataclass(frozen=True)
class TempName:
    """A parsed temporary name: what it is (``tmp``/``old``/``del``), for which target, by whom."""

    kind: str
    target: str
    pid: int


def make_temp_name(kind: str, target: str) -> str:
    """Return a fresh temporary name owned by this process, e.g. ``.tmp-step-00000200-42-9f0c``."""
    return f".{kind}-{target}-{os.getpid()}-{secrets.token_hex(4)}"


def parse_temp_name(name: str) -> TempName | None:
    """Return the parts of a temporary name, or None if ``name`` is not one of ours."""
    match = _TEMP_RE.match(name)
    if not match:
        return None
    return TempName(kind=match.group(1), target=match.group(2), pid=int(match.group(3)))
