"""How several processes share a run: the ``distributed.strategy`` of the config.

A strategy decides what Accelerate is given (plain data parallel, or an FSDP plugin), and how the
weights and the optimizer state of a prepared model are read for a checkpoint or the final export
and written back on resume. The loop, the checkpoints and the export only talk to a
:class:`Strategy`; ``ddp`` is the identity, ``fsdp`` lives in :mod:`gearshift.train.fsdp`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim import Optimizer

from gearshift.config.schema import DistributedConfig


class Strategy:
    """Data parallel (``ddp``): every process holds the whole model; one process writes.

    Args:
        config: The ``distributed`` section.
    """

    name = "ddp"

    def __init__(self, config: DistributedConfig) -> None:
        self.config = config

    def accelerator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Accelerator`` besides precision and device."""
        return {}

    def adopt(self, accelerator: Accelerator) -> Accelerator:
        """Finish setting up a freshly made Accelerator (nothing to do for DDP)."""
        return accelerator

    def describe(self) -> dict[str, Any]:
        """For the run's ``start`` event: the strategy and whether the model is sharded."""
        return {"strategy": self.name, "sharded": False}

    def prepare(self, accelerator: Accelerator, model: nn.Module,
                optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
        """``accelerator.prepare`` of the model and optimizer."""
        return accelerator.prepare(model, optimizer)

    def model_state(self, model: nn.Module, weights: nn.Module | Mapping[str, torch.Tensor]
                    ) -> nn.Module | Mapping[str, torch.Tensor]:
        """What a checkpoint stores of the (unwrapped) model, from what the transforms keep
        (``weights``: the module, or the tensors kept by name); call on every rank."""
        return weights

    def optimizer_for_save(self, model: nn.Module, optimizer: Optimizer) -> Any:
        """What checkpoints save as the optimizer (its ``state_dict()``); call on every rank."""
        return optimizer

    def model_for_load(self, model: nn.Module) -> nn.Module:
        """What checkpoints check against and load full tensors into (every rank)."""
        return model

    def optimizer_for_load(self, model: nn.Module, optimizer: Optimizer) -> Any:
        """What checkpoints load the optimizer state into (every rank): either layout, by
        parameter index (DDP) or by parameter name (FSDP), so a run changes strategy freely."""
        return OptimizerLoader(model, optimizer)

    def export_model(self, model: nn.Module, is_main: bool) -> nn.Module | None:
        """The plain model ``final/`` is written from, on the main process (call on every
        rank; None on the others)."""
        return model


class OptimizerLoader:
    """Loads an optimizer state keyed by parameter index (``optimizer.state_dict()``) or by
    parameter name (``get_optimizer_state_dict``, as FSDP checkpoints hold it) into a plain or
    sharded optimizer; every rank passes the full state and keeps its own part."""

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not any(isinstance(name, str) for group in state.get("param_groups", [])
                   for name in group.get("params", [])):
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        # It replaces the values it is given in place: give it a copy.
        set_optimizer_state_dict(self.model, self.optimizer, copy.deepcopy(state),
                                 options=StateDictOptions(full_state_dict=True))


def build_strategy(config: DistributedConfig) -> Strategy:
    """The strategy of the ``distributed`` section."""
    if config.strategy == "fsdp":
        from gearshift.train.fsdp import FsdpStrategy

        return FsdpStrategy(config)
    return Strategy(config)
