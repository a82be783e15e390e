"""Checking a local model directory before anything tries to load it.

Three kinds of directory are recognised, as transformers and PEFT write them:

* ``full``: ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``) and a tokenizer;
* ``sharded``: ``config.json``, an index (``model.safetensors.index.json`` or
  ``pytorch_model.bin.index.json``) whose every shard exists, and a tokenizer;
* ``adapter``: ``adapter_config.json`` and ``adapter_model.safetensors`` (a PEFT adapter) whose
  base model, named by ``base_model_name_or_path``, is a local model directory (relative to the
  adapter when relative); the tokenizer is the adapter's own or its base's.

Every problem is collected; nothing stops at the first one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gearshift.errors import ModelError
from gearshift.models.quantized import quantization_config_of

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
KINDS = ("full", "sharded", "adapter")


@dataclass
class ModelDirReport:
    """What :func:`validate_model_dir` found.

    Attributes:
        path: The directory checked.
        kind: ``"full"``, ``"sharded"`` or ``"adapter"``; None when the directory is invalid.
        problems: Every problem found, one sentence each (empty when valid).
        base: The adapter's base model directory, resolved (adapters only).
        tensors: How many tensor names were checked against the architecture (``load=True``).
    """

    path: Path
    kind: str | None
    problems: list[str] = field(default_factory=list)
    base: Path | None = None
    tensors: int | None = None

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-safe data (``gearshift model validate --json``)."""
        return {"path": str(self.path), "kind": self.kind, "ok": self.ok,
                "problems": list(self.problems),
                "base": str(self.base) if self.base is not None else None,
                "tensors_checked": self.tensors}

    def message(self) -> str:
        """One block naming the directory and every problem (the text of a ModelError)."""
        n = len(self.problems)
        head = f"model directory {self.path} is not valid ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def validate_model_dir(path: str | Path, *, load: bool = False) -> ModelDirReport:
    """Check a full, sharded or adapter model directory and list every problem.

    Args:
        path: A local directory, e.g. ``RUN_DIR/final``.
        load: Also read the weights' headers (safetensors metadata only: no tensor is read) and
            check the tensor names and shapes against the architecture of ``config.json``
            (instantiated on the meta device; tied weights may be stored once). An adapter's
            tensors are checked against the modules of its base.

    Returns:
        A :class:`ModelDirReport`; ``kind`` is None and ``problems`` is not empty when the
        directory is invalid. Nothing is raised for a bad directory.

    Example:
        >>> report = validate_model_dir("runs/tiny-20260101-120000/final")  # doctest: +SKIP
        >>> report.kind, report.ok, report.problems  # doctest: +SKIP
        ('full', True, [])
    """
    return _check(Path(path), load=load, tokenizer=True)


def require_model_dir(path: str | Path, *, tokenizer: bool = True,
                      load: bool = False) -> ModelDirReport:
    """:func:`validate_model_dir`, raising when the directory is invalid.

    Args:
        path: The directory.
        tokenizer: Whether a tokenizer is required (a run with ``model.tokenizer: byte`` needs
            none).
        load: As in :func:`validate_model_dir`.

    Raises:
        ModelError: Naming the directory and every problem, one per line.
    """
    report = _check(Path(path), load=load, tokenizer=tokenizer)
    if not report.ok:
        raise ModelError(report.message())
    return report


def is_adapter_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a directory holding ``adapter_config.json`` (a PEFT adapter)."""
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter: str | Path) -> Path:
    """The base model directory an adapter names, resolved against the adapter directory.

    Raises:
        ModelError: When ``adapter_config.json`` cannot be read or names no base model.
    """
    adapter = Path(adapter)
    problems: list[str] = []
    config = _json_object(adapter / ADAPTER_CONFIG, problems)
    base = _base_path(adapter, config, problems) if config is not None else None
    if base is None:
        raise ModelError(f"adapter directory {adapter}: {'; '.join(problems)}")
    return base


def has_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds tokenizer files that ``AutoTokenizer`` loads."""
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_dir(path: str | Path) -> Path:
    """Where the tokenizer of a model directory is: the directory itself, or for an adapter
    without one, its base model."""
    path = Path(path)
    if is_adapter_dir(path) and not has_tokenizer(path):
        return adapter_base(path)
    return path


# ---------------------------------------------------------------------------- the checks


def _check(path: Path, *, load: bool, tokenizer: bool) -> ModelDirReport:
    report = ModelDirReport(path=path, kind=None)
    if not path.exists():
        report.problems.append("the directory does not exist; check the path")
        return report
    if not path.is_dir():
        report.problems.append(
            "it is a file, not a directory; give the folder that holds config.json (a model) "
            "or adapter_config.json (a LoRA adapter)")
        return report
    if not any(path.iterdir()):
        report.problems.append(
            "the directory is empty; a model directory holds config.json, weights and a "
            "tokenizer, an adapter directory adapter_config.json and adapter_model.safetensors")
        return report
    if is_adapter_dir(path) or ((path / ADAPTER_WEIGHTS).is_file()
                                and not (path / CONFIG).is_file()):
        kind = "adapter"
        _check_adapter(report, load=load, tokenizer=tokenizer)
    else:
        kind = "sharded" if any((path / i).is_file() for i in INDEXES) else "full"
        _check_model(report, load=load, tokenizer=tokenizer)
    if report.ok:
        report.kind = kind
    return report


def _check_model(report: ModelDirReport, *, load: bool, tokenizer: bool) -> None:
    """A full or sharded model: config, weights (every shard), tokenizer."""
    path, problems = report.path, report.problems
    config = _json_object(path / CONFIG, problems)
    indexes = [path / name for name in INDEXES if (path / name).is_file()]
    weight_files: list[Path] = []
    shard_map: dict[str, str] = {}
    if indexes:
        for index in indexes:
            weight_map = _weight_map(index, problems)
            shard_map.update(weight_map)
            for shard in sorted(set(weight_map.values())):
                if (path / shard).is_file():
                    weight_files.append(path / shard)
                else:
                    problems.append(f"shard {shard} is missing (listed in {index.name})")
    else:
        weight_files = [path / name for name in WEIGHTS if (path / name).is_file()]
        if not weight_files:
            problems.append("no weights: expected model.safetensors, pytorch_model.bin or a "
                            "sharded index (model.safetensors.index.json) with its shards")
    if tokenizer and not has_tokenizer(path):
        problems.append("no tokenizer: expected tokenizer.json or tokenizer_config.json (save "
                        "one with tokenizer.save_pretrained(DIR))")
    quantized = None
    try:
        quantized = quantization_config_of(path)  # e.g. packed BitNet: a well-formed entry
    except ModelError as exc:
        problems.append(str(exc))
    if load and config is not None and weight_files and quantized is None:
        # Packed weights (uint8, with scales) do not have the architecture's float shapes.
        from gearshift.models.tensors import check_model_tensors

        report.tensors = check_model_tensors(path, config, weight_files, shard_map, problems)


def _check_adapter(report: ModelDirReport, *, load: bool, tokenizer: bool) -> None:
    """A PEFT adapter: its config and weights, and a valid local base model."""
    path, problems = report.path, report.problems
    config = _json_object(path / ADAPTER_CONFIG, problems)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = (" (adapter_model.bin is a pickle; save the adapter again with "
                "save_pretrained(DIR, safe_serialization=True))"
                if (path / "adapter_model.bin").is_file() else "")
        problems.append(f"{ADAPTER_WEIGHTS} is missing{hint}")
    if config is None:
        return
    base = _base_path(path, config, problems)
    if base is None:
        return
    report.base = base
    named = config["base_model_name_or_path"]
    if is_adapter_dir(base):
        problems.append(f"base model {named} ({base}) is itself an adapter; name the full model "
                        "it was trained on (merge the first adapter to stack them)")
        return
    base_report = _check(base, load=load, tokenizer=False)
    for problem in base_report.problems:
        problems.append(f"base model {named} ({base}): {problem}")
    if tokenizer and not has_tokenizer(path) and base.is_dir() and not has_tokenizer(base):
        problems.append(f"no tokenizer in the adapter directory or its base model {base}: "
                        "expected tokenizer.json or tokenizer_config.json (save one with "
                        "tokenizer.save_pretrained(DIR))")
    if load and base_report.ok and weights.is_file():
        from gearshift.models.tensors import check_adapter_tensors

        base_config = _json_object(base / CONFIG, [])
        if base_config is not None:
            report.tensors = check_adapter_tensors(base, base_config, weights, problems)


def _base_path(adapter: Path, config: dict[str, Any], problems: list[str]) -> Path | None:
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        problems.append(f"{ADAPTER_CONFIG} names no base model (base_model_name_or_path is "
                        f"{named!r}); set it to the base model's directory")
        return None
    base = Path(named).expanduser()
    return base if base.is_absolute() else (adapter / base)


def _json_object(file: Path, problems: list[str]) -> dict[str, Any] | None:
    if not file.is_file():
        problems.append(f"{file.name} is missing")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"{file.name} is not valid JSON ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{file.name} holds a JSON {type(data).__name__}, not an object")
        return None
    return data


def _weight_map(index: Path, problems: list[str]) -> dict[str, str]:
    """The well-formed entries of a shard index's ``weight_map``; a problem for every fault."""
    data = _json_object(index, problems)
    if data is None:
        return {}
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        problems.append(f"{index.name} has no 'weight_map' (a non-empty object of tensor name "
                        f"-> shard file), got {_short(weight_map)}")
        return {}
    good: dict[str, str] = {}
    bad = []
    for name, shard in weight_map.items():
        if (isinstance(shard, str) and shard and Path(shard).name == shard
                and shard not in (".", "..")):
            good[name] = shard
        else:
            bad.append(f"{name!r} -> {_short(shard)}")
    if bad:
        problems.append(f"{index.name}: weight_map entries must name a shard file in the same "
                        f"directory; {len(bad)} do not: {_listed(bad)}")
    return good


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _listed(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
