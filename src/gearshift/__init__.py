"""gearshift: fine-tuning with managed training dynamics.

Learning-rate schedules that follow the clock, phases that follow the loss, and runs that
survive crashes, kills, out-of-memory errors and NaNs without losing work.

Example:
    >>> import gearshift as gs
    >>> cfg = gs.load_config(None, {"training.max_steps": 50})
    >>> result = gs.train(cfg)
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from gearshift.config import Config, load_config
from gearshift.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GearshiftError,
    ModelError,
)

if TYPE_CHECKING:
    from gearshift.run import train
    from gearshift.train import (
        Callback,
        RunResult,
        Trainer,
        TrainingDiverged,
        TrainingInterrupted,
    )

# The trainer (torch, Accelerate, transformers) loads on first use, so that reading a run
# (``gearshift.rundir``, ``gearshift.report``) never imports it.
_LAZY = {"train": "gearshift.run", "Callback": "gearshift.train", "RunResult": "gearshift.train",
         "Trainer": "gearshift.train", "TrainingDiverged": "gearshift.train",
         "TrainingInterrupted": "gearshift.train"}


class _Package(types.ModuleType):
    """``gs.train`` is the function even though ``gearshift.train`` is also a sub-package:
    importing the sub-package must not replace the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name not in _LAZY:
            raise AttributeError(f"module 'gearshift' has no attribute {name!r}")
        value = getattr(importlib.import_module(_LAZY[name]), name)
        super().__setattr__(name, value)
        return value


sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "GearshiftError",
    "ModelError",
    "RunResult",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "__version__",
    "load_config",
    "train",
]
