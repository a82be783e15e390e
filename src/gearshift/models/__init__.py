"""Model directories: checking one (full, sharded or adapter) before it is loaded, and loading.

Example:
    >>> from gearshift.models import validate_model_dir
    >>> report = validate_model_dir("runs/tiny-20260101-120000/final")  # doctest: +SKIP
    >>> report.kind, report.ok  # doctest: +SKIP
    ('full', True)
"""

from gearshift.models.load import load_adapter, load_base_model
from gearshift.models.quantized import is_packed_bitnet, quantization_config_of
from gearshift.models.validate import (
    KINDS,
    ModelDirReport,
    adapter_base,
    has_tokenizer,
    is_adapter_dir,
    require_model_dir,
    tokenizer_dir,
    validate_model_dir,
)

__all__ = ["KINDS", "ModelDirReport", "adapter_base", "has_tokenizer", "is_adapter_dir",
           "is_packed_bitnet", "load_adapter", "load_base_model", "quantization_config_of",
           "require_model_dir", "tokenizer_dir", "validate_model_dir"]
