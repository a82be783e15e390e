"""Averaging training signals across distributed ranks.

The phase controller must make the same decision on every rank, so the trainer passes the step's
loss and the gradient-sign stability through :func:`reduce_signal` *before* they reach the
controller; each rank then feeds the controller the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["reduce_signal"]


def _reduce_device(accelerator: Any | None) -> torch.device:
    if accelerator is not None and getattr(accelerator, "device", None) is not None:
        return torch.device(accelerator.device)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_signal(value: float | None, accelerator: Any | None = None,
                  weight: float = 1.0) -> float | None:
    """Average a per-rank float over every rank of the default process group.

    Ranks holding ``None`` (no loss this step, no stability yet) are left out of the mean, and
    every rank returns the same value: the mean of the values given, or ``None`` when no rank gave
    one. A NaN on any rank makes the result NaN on every rank (a failing step stays visible to the
    trainer's NaN handling). This is a collective call: when ``torch.distributed`` is initialized with more than one
    process, every rank must call it, in the same order. Otherwise it returns ``value`` unchanged
    (as a float).

    Args:
        value: This rank's value (a Python float, a 0-d tensor or ``None``).
        accelerator: An ``accelerate.Accelerator`` (or anything with a ``.device``) choosing the
            device the reduction runs on; ``None`` picks CUDA for NCCL and CPU otherwise.
        weight: This rank's weight in the mean (e.g. the gradient elements a rank of a sharded
            model compared: the weighted mean of the shards' fractions is the whole model's).

    Returns:
        The cross-rank mean, or ``None``.

    Example:
        >>> reduce_signal(0.75)  # single process: identity
        0.75
    """
    if isinstance(value, torch.Tensor):
        value = float(value.detach().item())
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None if value is None else float(value)
    present = value is not None and not math.isnan(value)
    # A NaN stays visible as NaN on every rank rather than being averaged away.
    nan = value is not None and math.isnan(value)
    packed = torch.tensor(
        [value * weight if present else 0.0, weight if present else 0.0, 1.0 if nan else 0.0],
        dtype=torch.float64,
        device=_reduce_device(accelerator),
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    total, count, nans = packed.tolist()
    if nans > 0:
        return math.nan
    return total / count if count > 0 else None
