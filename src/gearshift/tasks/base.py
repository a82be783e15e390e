"""The task interface (defined beside the loop that calls it) and the loss protocol of a plain
``Trainer(..., loss_fn=...)``."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from gearshift.train.task import EvalLoop, LossFnTask, LossOutput, Task, TaskParts

__all__ = ["EvalLoop", "LossFnTask", "LossOutput", "Task", "TaskParts", "TokenWeightedLoss"]


@runtime_checkable
class TokenWeightedLoss(Protocol):
    """A loss summed over *units* (tokens, usually), with the unit count known before forward.

    The trainer divides each micro-batch's summed loss by the total units of the whole
    accumulation window, so that accumulating micro-batches gives exactly the gradient of one
    big batch — also when the micro-batches hold different numbers of tokens, and also for a
    short last window.

    A plain ``loss_fn(model, batch) -> Tensor`` (a mean over the batch) is weighted by the
    number of samples in the batch instead.
    """

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss *summed* over the batch's units."""
        ...

    def units(self, batch: Any) -> int:
        """How many units (e.g. target tokens) the batch's loss sums over."""
        ...
