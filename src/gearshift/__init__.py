"""gearshift: fine-tuning with managed training dynamics.

Learning-rate schedules that follow the clock, phases that follow the loss, and runs that
survive crashes, kills, out-of-memory errors and NaNs without losing work.

Example:
    >>> import gearshift as gs
    >>> cfg = gs.load_config(None, {"training.max_steps": 50})
    >>> result = gs.train(cfg)
"""

from gearshift.config import Config, load_config
from gearshift.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GearshiftError,
    ModelError,
)
from gearshift.run import train
from gearshift.train import (
    Callback,
    RunResult,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
)

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
