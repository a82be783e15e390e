"""The interface through which the loop knows a task: build, loss of a batch, evaluation, state.

The loop never learns the names of the kinds of training: it calls these hooks. Concrete tasks
(``lm`` and the ones to come) live in :mod:`gearshift.tasks`, which registers them in
``TASKS``; a plain ``Trainer(model, data, config, loss_fn=...)`` is wrapped in a
:class:`LossFnTask`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from gearshift.train import setup

if TYPE_CHECKING:
    from pydantic import BaseModel

    from gearshift.config import Config


@dataclass
class LossOutput:
    """A batch's loss as the loop needs it.

    Attributes:
        loss: The loss *summed* over the batch's units (a scalar tensor with a graph).
        units: How many units (target tokens, samples, ...) ``loss`` sums over; None means
            :meth:`Task.units` of the batch. The loop divides each micro-batch's loss by the
            units of the whole accumulation window, so accumulation equals one big batch.
        metrics: Extra values summed over the same units (floats or scalar tensors); the loop
            logs their per-unit means next to the loss.
    """

    loss: torch.Tensor
    units: int | None = None
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass
class TaskParts:
    """What a task builds for a run.

    Attributes:
        model: The module to train (before any transform such as LoRA).
        train_data: A map-style dataset.
        eval_data: A held-out map-style dataset, or None.
        tokenizer: Saved beside the model in ``final/`` when given.
        collate_fn: Merges samples into a batch (default: torch's ``default_collate``).
        result_metrics: Figures about the build (e.g. skipped data lines) added to the result.
        callbacks: The task's own observers of the run (e.g. to write a file of its own into
            the run directory); they run after the user's callbacks.
        transforms: The task's own model transforms, applied after those the config enables
            (e.g. a value head around the policy).
    """

    model: nn.Module
    train_data: Sequence[Any]
    eval_data: Sequence[Any] | None = None
    tokenizer: Any = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    result_metrics: dict[str, float] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)
    transforms: list[Any] = field(default_factory=list)


class EvalLoop(Protocol):
    """What the loop offers a task's :meth:`Task.evaluate`."""

    def totals(self, eval_data: Sequence[Any]) -> tuple[float, int, dict[str, float]]:
        """Summed loss, units and summed extra metrics over the whole eval set (all ranks).

        Batches are cut like training batches, shrunk after an out-of-memory error, and the
        model is in eval mode without gradients.
        """
        ...


class Task(ABC):
    """What a run trains and how it is judged.

    Subclass it, set :attr:`name` (and :attr:`config_section` when the task has its own config
    section, read from ``config.<section_name>``, by default ``config.<name>``), implement :meth:`build` and :meth:`loss`, and register the class in
    ``gearshift.tasks.TASKS``. State that must survive a resume goes in :meth:`state_dict`
    (JSON) and :meth:`tensor_state` (tensors, saved as safetensors).

    Args:
        config: The validated run config.

    Example:
        >>> class Regression(Task):
        ...     name = "regression"
        ...     def build(self): ...
        ...     def loss(self, model, batch):
        ...         x, y = batch
        ...         return LossOutput(((model(x) - y) ** 2).sum(), len(y))
    """

    name: ClassVar[str] = ""
    #: A pydantic model validating ``config.<name>`` (the task's own section), or None.
    config_section: ClassVar[type[BaseModel] | None] = None
    #: The top-level key of that section when it is not the task's name.
    section_name: ClassVar[str | None] = None

    def __init__(self, config: Config) -> None:
        self.config = config

    @abstractmethod
    def build(self) -> TaskParts:
        """Build the model, data and tokenizer of the run."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """The loss of one (device-side) batch, summed over its units."""

    def units(self, batch: Any) -> int:
        """Units of a (CPU-side) batch, known before its forward pass; default: its samples.

        The loop needs the units of a whole accumulation window before the first backward, to
        scale every micro-batch by the same total.
        """
        return setup.batch_size_of(batch)

    def evaluate(self, model: nn.Module, eval_data: Sequence[Any], loop: EvalLoop,
                 ) -> dict[str, float]:
        """What "better" means for this task; by default the per-unit eval loss."""
        total, units, sums = loop.totals(eval_data)
        metrics = {"eval/loss": total / max(units, 1)}
        metrics.update({f"eval/{k}": v / max(units, 1) for k, v in sums.items()})
        return metrics

    def start_attempt(self) -> None:
        """Called before every attempt at an optimizer step (a retry after an out-of-memory
        error included): drop what a failed attempt left half-counted."""
        return None

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """Called after each optimizer update (``step`` updates done; skipped steps never get
        here); returns metrics logged with that step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The task's own JSON-safe state (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        return None

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """The task's own tensors (saved as ``task.safetensors`` when not empty)."""
        return {}

    def load_tensor_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`tensor_state`."""
        return None


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped so that a diverged run logs a number rather than inf."""
    return math.exp(min(loss, 50.0))


class LossFnTask(Task):
    """A user's own module and ``loss_fn`` as a task (what ``Trainer(..., loss_fn=...)`` runs).

    ``loss_fn(model, batch)`` gives the batch's *mean* loss, weighted by its samples; a
    :class:`~gearshift.tasks.TokenWeightedLoss` (``__call__`` summed + ``units(batch)``) is
    weighted by its units; without ``loss_fn`` the model's own ``loss`` output is used.
    """

    name = "loss_fn"

    def __init__(self, config: Config, loss_fn: Callable[..., torch.Tensor] | None) -> None:
        super().__init__(config)
        self.loss_fn = loss_fn
        self.token_weighted = loss_fn is not None and hasattr(loss_fn, "units")

    def build(self) -> TaskParts:
        raise NotImplementedError("the Trainer was given its model and data")

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        fn = self.loss_fn
        if self.token_weighted:
            return LossOutput(fn(model, batch))  # type: ignore[misc]
        if fn is not None:
            loss = fn(model, batch)
        else:
            out = model(**batch) if isinstance(batch, Mapping) else model(batch)
            loss = setup.output_loss(out)
        n = setup.batch_size_of(batch)
        return LossOutput(loss * n, n)

    def units(self, batch: Any) -> int:
        if self.token_weighted:
            return int(self.loss_fn.units(batch))  # type: ignore[union-attr]
        return setup.batch_size_of(batch)

    def evaluate(self, model: nn.Module, eval_data: Sequence[Any], loop: EvalLoop,
                 ) -> dict[str, float]:
        metrics = super().evaluate(model, eval_data, loop)
        metrics["eval/ppl"] = perplexity(metrics["eval/loss"])
        return metrics
