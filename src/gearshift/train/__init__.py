"""The training loop on Hugging Face Accelerate; it knows tasks and transforms only through
their interfaces (``gs.train(config)``, which picks a task, lives in :mod:`gearshift.run`)."""

from gearshift.train.callbacks import Callback
from gearshift.train.interrupt import TrainingDiverged, TrainingInterrupted
from gearshift.train.task import LossOutput, Task, TaskParts
from gearshift.train.trainer import RunResult, Trainer

__all__ = ["Callback", "LossOutput", "RunResult", "Task", "TaskParts", "Trainer",
           "TrainingDiverged", "TrainingInterrupted"]
