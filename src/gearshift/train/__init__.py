"""The training loop on Hugging Face Accelerate, and the built-in ``train(config)`` entry point."""

from gearshift.train.api import train
from gearshift.train.callbacks import Callback
from gearshift.train.interrupt import TrainingDiverged, TrainingInterrupted
from gearshift.train.trainer import RunResult, Trainer

__all__ = ["Callback", "RunResult", "Trainer", "TrainingDiverged", "TrainingInterrupted", "train"]
