"""Building the pieces a run needs: accelerator, optimizer, schedule length, batch helpers."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from gearshift.config import Config
from gearshift.errors import ConfigError, Problem
from gearshift.signals import LossNotFoundWarning, resolve_loss
from gearshift.train.strategy import Strategy

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(precision: str, strategy: Strategy | None = None) -> Accelerator:
    """An Accelerator for this precision and distributed strategy; replaces one left by an
    earlier run in this process."""
    # Without a GPU, a multi-process launch (torchrun / accelerate launch) must ask Accelerate
    # for CPU explicitly, or every process silently trains alone on the same data.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    extra = strategy.accelerator_kwargs() if strategy is not None else {}
    try:
        acc = Accelerator(mixed_precision=PRECISION[precision], cpu=cpu, **extra)
    except ValueError:
        # Accelerate keeps one global state per process; a second run with another precision
        # (tests, notebooks, pipelines) has to reset it first.
        AcceleratorState._reset_state(reset_partial_state=False)
        acc = Accelerator(mixed_precision=PRECISION[precision], cpu=cpu, **extra)
    return strategy.adopt(acc) if strategy is not None else acc


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW (or SGD) over trainable parameters; no weight decay on biases and norms."""
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError([Problem("model", "the model has no trainable parameters")])
    if o.weight_decay > 0:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    else:  # one group: every fused / foreach update runs once over all parameters
        groups = [{"params": params, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.learning_rate, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=o.learning_rate, betas=o.betas, eps=o.eps)


def schedule_lengths(config: Config, steps_per_epoch: int) -> tuple[int, int, int]:
    """(total optimizer steps, schedule length, schedule warmup) in the schedule's own unit.

    Raises:
        ConfigError: when the warmup is not shorter than the schedule.
    """
    t, s = config.training, config.schedule
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    if s.interval == "epoch":
        length = math.ceil(total_steps / steps_per_epoch)
        if s.warmup_steps is not None:
            raise ConfigError([Problem(
                "schedule.warmup_steps",
                "schedule.interval is 'epoch': give the warmup as warmup_epochs or warmup_ratio")])
        warmup = s.warmup_epochs if s.warmup_epochs is not None else round(
            (s.warmup_ratio or 0.0) * length)
        unit = "epochs"
    else:
        length = total_steps
        if s.warmup_steps is not None:
            warmup = s.warmup_steps
        elif s.warmup_epochs is not None:
            warmup = s.warmup_epochs * steps_per_epoch
        else:
            warmup = round((s.warmup_ratio or 0.0) * total_steps)
        unit = "steps"
    if warmup >= length and warmup > 0:
        raise ConfigError([Problem(
            "schedule", f"warmup ({warmup} {unit}) must be shorter than the run ({length} {unit}, "
            f"{steps_per_epoch} steps per epoch); shorten the warmup or train longer")])
    return total_steps, length, warmup


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for value in batch.values():
            return batch_size_of(value)
    if isinstance(batch, list | tuple) and batch:
        return batch_size_of(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def tokens_of(batch: Any) -> int:
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return int(batch["input_ids"].numel())
    return batch_size_of(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def output_loss(output: Any) -> torch.Tensor:
    """The loss in what a model returned (the rule of :func:`gearshift.signals.resolve_loss`).

    Raises:
        TypeError: when there is no scalar loss; the trainer cannot go on without one.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossNotFoundWarning)  # the error below says it all
        loss = resolve_loss(output)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(())
    what = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else \
        f"a {type(output).__name__} with no scalar loss"
    raise TypeError(f"the model returned {what}; pass loss_fn=... to the Trainer, or make the "
                    "model return its loss")
