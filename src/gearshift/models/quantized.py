"""Quantized model directories: what ``quantization_config`` in ``config.json`` says.

A packed BitNet b1.58 export (``quant_method: bitnet``) is a full model directory whose Linear
weights are stored quantized; transformers rebuilds the quantized layers from this entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gearshift.errors import ModelError


def quantization_config_of(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of ``path/config.json`` (None: no such entry, or no readable
    config).

    Raises:
        ModelError: When the entry exists but is not an object with a ``quant_method``.

    Example:
        >>> quantization_config_of("runs/qat-20261203-101500/final")  # doctest: +SKIP
        {'quant_method': 'bitnet', 'linear_class': 'bitlinear', ...}
    """
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "quantization_config" not in config:
        return None
    quant = config["quantization_config"]
    if not isinstance(quant, dict) or not isinstance(quant.get("quant_method"), str):
        raise ModelError(f"{Path(path) / 'config.json'}: quantization_config must be an object "
                         "with a quant_method (e.g. 'bitnet'); re-export the model or remove "
                         "the entry")
    return quant


def is_packed_bitnet(path: str | Path) -> bool:
    """Whether ``path`` is a packed BitNet export (a full model, ``quant_method: bitnet``)."""
    quant = quantization_config_of(path)
    return quant is not None and quant["quant_method"] == "bitnet"
