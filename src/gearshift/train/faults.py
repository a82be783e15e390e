"""Fault injection for tests and drills (``faults`` section, settable with ``--set``).

Both faults are forward hooks on the model, outside the training step:

- ``faults.oom_when_batch_above: N`` raises a genuine ``torch.OutOfMemoryError`` whenever a
  forward pass receives more than ``N`` samples;
- ``faults.nan_at_steps: [..]`` makes the output of those optimizer steps NaN (so is their loss):
  each entry spoils one attempt of the step, so ``[6, 6, 6]`` fails step 6 three times in a row
  (enough to trigger a rollback).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def _samples_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0


def install_oom_fault(model: nn.Module, limit: int) -> torch.utils.hooks.RemovableHandle:
    """Make ``model``'s forward raise ``torch.OutOfMemoryError`` above ``limit`` samples."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        n = _samples_in(args, kwargs)
        if n > limit:
            raise torch.OutOfMemoryError(
                f"out of memory: a forward pass of {n} samples (injected by "
                f"faults.oom_when_batch_above={limit})")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _poisoned(output: Any) -> Any:
    """``output`` with every floating-point tensor in it multiplied by NaN."""
    if isinstance(output, torch.Tensor):
        return output * float("nan") if output.is_floating_point() else output
    if isinstance(output, Mapping):  # transformers' ModelOutput is a mapping too
        for key, value in list(output.items()):
            output[key] = _poisoned(value)
        return output
    if isinstance(output, list | tuple):
        return type(output)(_poisoned(v) for v in output)
    return output


def install_nan_fault(model: nn.Module, steps: Iterable[int],
                      attempt: Callable[[], tuple[int, int]],
                      ) -> torch.utils.hooks.RemovableHandle:
    """Make the training forward passes of ``steps`` return NaN, one attempt per entry.

    Args:
        model: The module whose output is spoiled.
        steps: Optimizer steps (1-based), repeated to spoil several attempts.
        attempt: ``(step being computed, attempt number)`` of the loop right now.
    """
    pending = Counter(steps)
    spoiled: set[tuple[int, int]] = set()

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training:
            return None  # evaluation is never spoiled
        key = attempt()
        if key not in spoiled:
            if pending[key[0]] <= 0:
                return None
            pending[key[0]] -= 1
            spoiled.add(key)
        return _poisoned(output)

    return model.register_forward_hook(hook)
