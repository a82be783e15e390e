"""Model directories: checking that one is complete before it is loaded.

Example:
    >>> from gearshift.models import validate_model_dir
    >>> validate_model_dir("runs/tiny-20260101-120000/final")  # doctest: +SKIP
"""

from gearshift.models.quantized import is_packed_bitnet, quantization_config_of
from gearshift.models.validate import validate_model_dir

__all__ = ["is_packed_bitnet", "quantization_config_of", "validate_model_dir"]
