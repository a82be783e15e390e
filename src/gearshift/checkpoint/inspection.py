"""Describe a checkpoint without loading it: step, phase, schedule and data position, every
tensor file (names, shapes, dtypes, sizes read from the safetensors header only) and whether the
manifest verifies.

The module is not called ``inspect`` so that running a file from this folder as a script cannot
shadow the standard library's ``inspect``, which torch imports.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from gearshift.checkpoint.layout import (
    LATEST_LINK,
    MANIFEST_FILE,
    TRAINER_STATE_FILE,
    parse_step_dir,
)
from gearshift.checkpoint.manifest import verify_checkpoint
from gearshift.errors import CheckpointError, UsageError

# safetensors dtype code -> (torch dtype name, bits per element).
_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 8), "U8": ("uint8", 8), "I8": ("int8", 8), "U16": ("uint16", 16),
    "I16": ("int16", 16), "F16": ("float16", 16), "BF16": ("bfloat16", 16),
    "U32": ("uint32", 32), "I32": ("int32", 32), "F32": ("float32", 32),
    "U64": ("uint64", 64), "I64": ("int64", 64), "F64": ("float64", 64),
    "C64": ("complex64", 64), "F8_E4M3": ("float8_e4m3fn", 8), "F8_E5M2": ("float8_e5m2", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8), "F4": ("float4_e2m1fn_x2", 4),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it.

    Attributes:
        name: The tensor's name in the file.
        dtype: The torch dtype name (``float32``, ``bfloat16``, ...), or the raw code if unknown.
        shape: The shape.
        elements: The number of elements.
        bytes: The size of its data, or None for a dtype this reader does not know.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    elements: int
    bytes: int | None


@dataclass
class TensorFileInfo:
    """One ``.safetensors`` file: its tensors, or why it could not be read.

    Attributes:
        name: The file name.
        file_bytes: The size on disk.
        tensors: The tensors by name, numbers in names in numeric order (empty when ``error``
            is set).
        metadata: The header's ``__metadata__`` (string to string).
        error: Why the header could not be parsed, or None.
    """

    name: str
    file_bytes: int
    tensors: list[TensorInfo] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def elements(self) -> int:
        """Elements over all tensors of the file."""
        return sum(t.elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        """Data bytes over all tensors whose dtype is known."""
        return sum(t.bytes or 0 for t in self.tensors)


@dataclass
class CheckpointReport:
    """What :func:`inspect_checkpoint` found; ``to_dict()`` is the ``--json`` output.

    Attributes:
        path: The checkpoint folder (``latest`` and run directories resolved) or the file.
        kind: ``"checkpoint"`` (a folder) or ``"safetensors"`` (a single file).
        step: The step from the manifest, the trainer state or the folder name; None if unknown.
        total_steps: The run length the trainer state records, if any.
        phase: ``name``, ``index``, ``count`` and ``steps_in_phase`` of the training phase.
        schedule: ``name``, ``last_epoch``, ``total_steps``, ``multiplier`` and ``lrs``.
        data: ``epoch``, ``micro_batch``, ``samples_seen`` and ``tokens_seen``.
        files: Every ``.safetensors`` file, sorted by name.
        manifest: ``"ok"``, ``"corrupt"``, ``"absent"`` (a folder gearshift did not write) or
            ``"n/a"`` (a single file).
        problems: The manifest check's problems, one per bad or missing file.
        notes: Anything that could not be read (e.g. an unreadable ``trainer_state.json``).
    """

    path: Path
    kind: str
    step: int | None = None
    total_steps: int | None = None
    phase: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    files: list[TensorFileInfo] = field(default_factory=list)
    manifest: str = "n/a"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-safe dict (sizes in bytes, shapes as lists)."""
        return {
            "path": str(self.path), "kind": self.kind, "step": self.step,
            "total_steps": self.total_steps, "phase": self.phase, "schedule": self.schedule,
            "data": self.data,
            "manifest": {"status": self.manifest, "problems": list(self.problems)},
            "files": [
                {"name": f.name, "file_bytes": f.file_bytes, "error": f.error,
                 "metadata": f.metadata, "tensor_count": len(f.tensors),
                 "elements": f.elements, "tensor_bytes": f.tensor_bytes,
                 "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                              "elements": t.elements, "bytes": t.bytes} for t in f.tensors]}
                for f in self.files
            ],
            "totals": {"files": len(self.files),
                       "tensors": sum(len(f.tensors) for f in self.files),
                       "elements": sum(f.elements for f in self.files),
                       "tensor_bytes": sum(f.tensor_bytes for f in self.files)},
            "notes": list(self.notes),
        }


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Return the checkpoint folder or ``.safetensors`` file that ``path`` stands for.

    ``latest`` resolves to the folder it points to; a run directory or its ``checkpoints``
    folder resolves to the ``latest`` checkpoint (or the highest ``step-*`` when the link is
    missing).

    Raises:
        UsageError: If ``path`` does not exist.
        CheckpointError: If it is neither a checkpoint, a run directory nor a safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; give a step-XXXXXXXX checkpoint folder, a run "
                         "directory or a .safetensors file")
    if path.is_symlink() and path.is_dir():
        path = path.parent / os.readlink(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is not a checkpoint: inspect reads checkpoint folders and .safetensors "
                "files; convert a torch file first with `gearshift checkpoint convert SRC DST`")
        return path
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if _is_checkpoint_folder(path):
        return path
    newest = _newest_in(checkpoints)
    if newest is not None:
        return newest
    if checkpoints is not path:
        raise CheckpointError(f"{checkpoints} holds no step-* checkpoints (the run saved none)")
    raise CheckpointError(
        f"{path} is not a checkpoint: no {MANIFEST_FILE}, {TRAINER_STATE_FILE} or .safetensors "
        "file in it, and no checkpoints/ folder; give a step-XXXXXXXX folder or a run directory")


def _is_checkpoint_folder(path: Path) -> bool:
    return (parse_step_dir(path.name) is not None or (path / MANIFEST_FILE).is_file()
            or (path / TRAINER_STATE_FILE).is_file() or any(path.glob("*.safetensors")))


def _newest_in(directory: Path) -> Path | None:
    link = directory / LATEST_LINK
    if link.is_symlink() and (directory / os.readlink(link)).is_dir():
        return directory / os.readlink(link)
    steps = [(s, p) for p in directory.iterdir()
             if (s := parse_step_dir(p.name)) is not None and p.is_dir()]
    return max(steps)[1] if steps else None


def _natural(name: str) -> list[Any]:
    # "state.2" before "state.10": the header itself is sorted as plain strings.
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name)]


def read_tensor_file(file: Path) -> TensorFileInfo:
    """Describe the tensors of one ``.safetensors`` file from its header (no data is read).

    A header that cannot be parsed is reported in ``error``, not raised.
    """
    info = TensorFileInfo(name=file.name, file_bytes=file.stat().st_size)
    try:
        with safe_open(str(file), framework="pt") as handle:
            info.metadata = dict(handle.metadata() or {})
            for name in sorted(handle.keys(), key=_natural):
                piece = handle.get_slice(name)
                code, shape = piece.get_dtype(), tuple(piece.get_shape())
                dtype, bits = _DTYPES.get(code, (code, 0))
                elements = math.prod(shape)
                info.tensors.append(TensorInfo(
                    name=name, dtype=dtype, shape=shape, elements=elements,
                    bytes=(elements * bits + 7) // 8 if bits else None))
    except Exception as exc:  # safetensors raises its own error type for every parse failure
        info.tensors = []
        info.error = f"cannot be parsed as safetensors ({exc})"
    return info


def inspect_checkpoint(path: str | Path) -> CheckpointReport:
    """Describe a checkpoint folder, a run's latest checkpoint, or one ``.safetensors`` file.

    Only JSON files and safetensors headers are read; no tensor is loaded and nothing changes.
    The manifest is verified (every sha256 is computed) for folders that have one.

    Args:
        path: A ``step-XXXXXXXX`` folder, the ``latest`` link, a run directory (its latest
            checkpoint is used), a ``checkpoints`` folder, or a ``.safetensors`` file.

    Returns:
        The report; a corrupt checkpoint is reported (``manifest == "corrupt"``), not raised.

    Raises:
        UsageError: If ``path`` does not exist.
        CheckpointError: If ``path`` is not a checkpoint, or is a ``.safetensors`` file whose
            header cannot be parsed.

    Example:
        >>> report = inspect_checkpoint("runs/tiny/checkpoints/latest")  # doctest: +SKIP
        >>> report.step, report.manifest
        (200, 'ok')
    """
    target = resolve_checkpoint_path(path)
    if target.is_file():
        info = read_tensor_file(target)
        if info.error is not None:
            raise CheckpointError(f"{target}: {info.error}")
        return CheckpointReport(path=target, kind="safetensors", files=[info])
    report = CheckpointReport(path=target, kind="checkpoint", step=parse_step_dir(target.name))
    report.files = [read_tensor_file(f) for f in sorted(target.glob("*.safetensors"))]
    if (target / MANIFEST_FILE).is_file() or report.step is not None:
        report.problems = verify_checkpoint(target)
        report.manifest = "corrupt" if report.problems else "ok"
        manifest_step = _manifest_step(target)
        report.step = manifest_step if manifest_step is not None else report.step
    else:
        report.manifest = "absent"
    state_file = target / TRAINER_STATE_FILE
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError("expected a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            report.notes.append(f"{TRAINER_STATE_FILE}: unreadable ({exc})")
        else:
            _read_trainer_state(report, state)
    return report


def _manifest_step(folder: Path) -> int | None:
    try:
        step = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")).get("step")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return step if _is_int(step) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_trainer_state(report: CheckpointReport, state: dict[str, Any]) -> None:
    # The state is untrusted JSON: every field is checked before use and skipped if malformed.
    if report.step is None and _is_int(state.get("step")):
        report.step = state["step"]
    if _is_int(state.get("total_steps")):
        report.total_steps = state["total_steps"]
    phases = state.get("phases")
    if isinstance(phases, dict) and _is_int(phases.get("phase_index")):
        index, names = phases["phase_index"], phases.get("phase_names")
        names = names if isinstance(names, list) else []
        report.phase = {
            "name": str(names[index]) if 0 <= index < len(names) else None,
            "index": index, "count": len(names) or None,
            "steps_in_phase": phases.get("steps_in_phase")
            if _is_int(phases.get("steps_in_phase")) else None,
        }
    schedule = state.get("schedule")
    if isinstance(schedule, dict):
        report.schedule = _schedule_position(schedule)
        if isinstance(state.get("schedule_interval"), str):
            report.schedule["interval"] = state["schedule_interval"]
    position = state.get("position")
    data = {key: position.get(key) for key in ("epoch", "micro_batch")
            if isinstance(position, dict) and _is_int(position.get(key))}
    data |= {key: state[key] for key in ("samples_seen", "tokens_seen") if _is_int(state.get(key))}
    report.data = data or None


def _schedule_position(state: dict[str, Any]) -> dict[str, Any]:
    params = state.get("params") if isinstance(state.get("params"), dict) else {}
    last_epoch = state.get("last_epoch")
    out: dict[str, Any] = {
        "name": state.get("name") if isinstance(state.get("name"), str) else None,
        "last_epoch": last_epoch if _is_int(last_epoch) else None,
        "total_steps": params.get("total_steps") if _is_int(params.get("total_steps")) else None,
        "multiplier": None, "lrs": None,
    }
    try:
        import torch

        from gearshift.schedules import GearshiftLR

        # A throwaway optimizer with one group per saved base LR lets GearshiftLR rebuild the
        # exact multiplier, plateau factor included, from the saved state alone.
        groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": float(lr)}
                  for lr in state.get("base_lrs") or []]
        scheduler = GearshiftLR.from_state_dict(torch.optim.SGD(groups), state)
        out["multiplier"] = scheduler.current_multiplier()
        out["lrs"] = [float(lr) for lr in scheduler.get_last_lr()]
    except Exception:  # An unknown or malformed state only loses the multiplier.
        pass
    return out


def human_size(n: int | None) -> str:
    """Format a byte count as ``"12 B"``, ``"3.4 KiB"``, ``"1.2 GiB"`` (``"?"`` for None)."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_report(report: CheckpointReport) -> str:
    """Render a report as the human-readable text of ``gearshift checkpoint inspect``."""
    lines = [f"{report.kind}: {report.path}"]
    if report.step is not None:
        of = f" of {report.total_steps}" if report.total_steps is not None else ""
        lines.append(f"step:      {report.step}{of}")
    if report.phase is not None:
        p = report.phase
        where = f" ({p['index'] + 1}/{p['count']})" if p["count"] else f" (index {p['index']})"
        steps = f", {p['steps_in_phase']} steps in phase" if p["steps_in_phase"] is not None else ""
        lines.append(f"phase:     {p['name'] or '?'}{where}{steps}")
    if report.schedule is not None:
        s = report.schedule
        of = f"/{s['total_steps']}" if s["total_steps"] is not None else ""
        text = f"schedule:  {s['name'] or '?'} at {s['last_epoch']}{of}"
        if s.get("interval"):
            text += f" {s['interval']}s"
        if s["multiplier"] is not None:
            text += f", multiplier {s['multiplier']:.6g}"
            text += f", lr {', '.join(f'{lr:.6g}' for lr in s['lrs'])}" if s["lrs"] else ""
        lines.append(text)
    if report.data:
        d = report.data
        parts = [f"{k.replace('_', ' ')} {d[k]}" for k in ("epoch", "micro_batch") if k in d]
        seen = [f"{d[k]:,} {k.split('_')[0]}" for k in ("samples_seen", "tokens_seen") if k in d]
        lines.append(f"data:      {', '.join(parts) or '?'}"
                     + (f" ({', '.join(seen)} seen)" if seen else ""))
    if report.manifest == "ok":
        lines.append("manifest:  ok (every sha256 matches)")
    elif report.manifest == "corrupt":
        n = len(report.problems)
        lines.append(f"manifest:  CORRUPT ({n} problem{'s' if n != 1 else ''})")
        lines.extend(f"  - {problem}" for problem in report.problems)
    elif report.manifest == "absent":
        lines.append(f"manifest:  none (no {MANIFEST_FILE}; nothing to verify)")
    lines.extend(f"note:      {note}" for note in report.notes)
    for info in report.files:
        lines.append("")
        if info.error is not None:
            lines.append(f"{info.name}  ({human_size(info.file_bytes)}): UNREADABLE, "
                         f"{info.error}")
            continue
        n = len(info.tensors)
        lines.append(f"{info.name}  ({human_size(info.file_bytes)}, "
                     f"{n} tensor{'s' if n != 1 else ''}, {info.elements:,} elements)")
        rows = [(t.name, t.dtype, "[" + ", ".join(map(str, t.shape)) + "]", human_size(t.bytes))
                for t in info.tensors]
        widths = [max([len(h), *(len(r[i]) for r in rows)])
                  for i, h in enumerate(("name", "dtype", "shape", "size"))]
        for row in [("name", "dtype", "shape", "size"), *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                         .rstrip())
    totals = report.to_dict()["totals"]
    lines.append("")
    lines.append(f"total: {totals['files']} file{'s' if totals['files'] != 1 else ''}, "
                 f"{totals['tensors']} tensor{'s' if totals['tensors'] != 1 else ''}, "
                 f"{totals['elements']:,} elements, "
                 f"{human_size(totals['tensor_bytes'])}")
    return "\n".join(lines)
