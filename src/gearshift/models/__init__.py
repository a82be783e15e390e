"""Model directories: checking that one is complete before it is loaded.

Example:
    >>> from gearshift.models import validate_model_dir
    >>> validate_model_dir("runs/tiny-20260101-120000/final")  # doctest: +SKIP
"""

from gearshift.models.validate import validate_model_dir

__all__ = ["validate_model_dir"]
