"""Finding the loss in whatever a model or a ``training_step`` returns."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["LOSS_KEYS", "LossNotFoundWarning", "resolve_loss"]

#: Keys tried, in this order, when a mapping (dict or ``transformers`` ``ModelOutput``) is returned.
LOSS_KEYS: tuple[str, ...] = ("loss", "train_loss", "total_loss")


class LossNotFoundWarning(UserWarning):
    """A model output held no recognisable loss; the step's loss is reported as ``None``."""


# One warning per distinct shape of output, not one per step: a training loop calls
# resolve_loss thousands of times with the same kind of output.
_warned: set[tuple[str, ...]] = set()
_warned_lock = threading.Lock()


def _warn_once(signature: tuple[str, ...], message: str) -> None:
    with _warned_lock:
        if signature in _warned:
            return
        _warned.add(signature)
    warnings.warn(message, LossNotFoundWarning, stacklevel=3)


def _is_scalar_loss(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()


def resolve_loss(output: Any, key: str | None = None) -> torch.Tensor | None:
    """Return the loss tensor held by ``output``, or ``None`` (with one warning) if there is none.

    Rules, in order:

    1. A tensor *is* the loss and is returned as it is.
    2. A mapping (a ``dict`` or a ``transformers`` ``ModelOutput``) gives ``output[key]`` when
       ``key`` is given, otherwise the first of ``loss``, ``train_loss``, ``total_loss`` that holds
       a tensor (entries that are ``None`` count as absent).
    3. Otherwise, a mapping holding exactly one floating-point scalar tensor gives that tensor.
    4. Anything else gives ``None`` and a :class:`LossNotFoundWarning` naming the keys found. The
       warning is issued once per distinct set of keys (or output type), not once per step.

    Args:
        output: What the model (or a user's loss function / ``training_step``) returned.
        key: The mapping key holding the loss, when it is not one of :data:`LOSS_KEYS`.

    Returns:
        The loss tensor, or ``None`` when ``output`` holds no recognisable loss.

    Example:
        >>> import torch
        >>> resolve_loss({"logits": torch.zeros(2), "loss": torch.tensor(0.5)})
        tensor(0.5000)
        >>> resolve_loss({"nll": torch.tensor(1.0), "logits": torch.zeros(2, 3)})
        tensor(1.)
    """
    if isinstance(output, torch.Tensor):
        return output
    if not isinstance(output, Mapping):
        kind = type(output).__name__
        _warn_once(
            ("<type>", kind),
            f"cannot find a loss in a model output of type {kind}; expected a tensor or a mapping "
            f"with one of {list(LOSS_KEYS)}. Return the loss tensor (or a dict with a 'loss' "
            "entry); this step's loss is treated as missing.",
        )
        return None

    keys = tuple(str(k) for k in output.keys())
    candidates = (key,) if key is not None else LOSS_KEYS
    for name in candidates:
        value = output.get(name)
        if isinstance(value, torch.Tensor):
            return value
    if key is None:
        scalars = [v for v in output.values() if _is_scalar_loss(v)]
        if len(scalars) == 1:
            return scalars[0]
    wanted = f"the key {key!r}" if key is not None else f"any of {list(LOSS_KEYS)}"
    hint = (
        "pass the right key" if key is not None else "return a 'loss' entry or pass key=<name>"
    )
    _warn_once(
        ("<key>", str(key), *sorted(keys)),
        f"cannot find a loss in the model output: it has no tensor under {wanted} and not "
        f"exactly one scalar tensor; keys found: {list(keys)}. To fix it, {hint}. This "
        "warning is shown once per kind of output; such steps report no loss.",
    )
    return None
