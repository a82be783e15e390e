"""Checking a local model directory before anything tries to load it."""

from __future__ import annotations

import json
from pathlib import Path

from gearshift.errors import ModelError
from gearshift.models.quantized import quantization_config_of

# Files whose presence means the directory holds weights (sharded or not).
_WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def validate_model_dir(path: str | Path) -> None:
    """Check that a Hugging Face model directory has its config and every weight file.

    Every problem is found before transformers or the tokenizer gets to complain about the
    first one, so the message lists all that is missing at once.

    Args:
        path: A local model directory (``config.json`` plus ``model.safetensors``, a sharded
            index with its shards, or ``pytorch_model.bin``).

    Raises:
        ModelError: If ``path`` is not a directory, a shard index is not a JSON object with a
            ``weight_map``, or ``config.json``, the weights or a listed shard are missing.

    Example:
        >>> validate_model_dir("runs/tiny-20260101-120000/final")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model.path {path} is not a directory")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    weights = [p for p in path.iterdir() if p.suffix == ".safetensors" or p.name in _WEIGHT_NAMES]
    if not weights:
        missing.append("weights (model.safetensors or a sharded index)")
    for index in (path / name for name in _INDEXES):
        if index.is_file():
            missing.extend(_missing_shards(index))
    if missing:
        raise ModelError(f"model directory {path} is missing: {', '.join(missing)}")
    quantization_config_of(path)  # a quantized full model (e.g. packed BitNet): a sound entry


def _missing_shards(index: Path) -> list[str]:
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        if not all(isinstance(x, str) for x in shards):
            raise TypeError("shard names must be strings")
    except (ValueError, KeyError, AttributeError, TypeError, UnicodeDecodeError):
        raise ModelError(f"{index} is not a valid shard index (expected a JSON object "
                         "with a 'weight_map' of tensor name -> shard file)") from None
    return [f"shard {s} (listed in {index.name})" for s in sorted(shards)
            if not (index.parent / s).is_file()]
