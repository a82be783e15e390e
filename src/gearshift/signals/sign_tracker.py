"""Gradient-sign agreement: how many gradient elements keep their sign from one step to the next.

A run whose gradients point the same way step after step is making steady progress on the same
directions; a run whose signs flip at random is mostly following noise. The phase controller uses
this fraction ("gradient stability") as one of its exit criteria.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from gearshift.errors import CheckpointError

__all__ = ["GradientSignTracker"]

_STATE_VERSION = 1


class GradientSignTracker:
    """Fraction of gradient elements whose sign agrees with their sign at the previous update.

    Call :meth:`update` once per optimizer step, after ``backward()`` (and after any gradient
    unscaling / clipping) and before ``zero_grad()``. It only reads ``.grad``, so it works with
    any optimizer.

    Definition: over every tracked parameter that has a gradient this step *and* had one at an
    earlier update, the result is ``agreeing elements / compared elements`` — weighted by element
    count, never an average of per-tensor fractions. Signs are ``torch.sign`` values (-1, 0, +1),
    compared exactly: a zero gradient agrees only with a zero gradient at that element's previous
    update (0 == 0), and disagrees with +1 or -1. Parameters without a gradient this step are
    skipped and keep their old signs. When nothing could be compared (the first update, or no
    gradients at all) :meth:`update` returns ``None``.

    Cost: one ``int8`` sign buffer per tracked parameter, allocated lazily on the parameter's
    device the first time it has a gradient (1 byte per element, :attr:`bytes_per_element`), and
    exactly one device-to-host transfer per call that compares anything (the count is accumulated
    on the device and read once).

    Args:
        parameters: The parameters to track: tensors (keyed ``"0"``, ``"1"``, … by position), or
            ``(name, tensor)`` pairs such as ``model.named_parameters()`` (keyed by name).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(4))
        >>> tracker = GradientSignTracker([w])
        >>> w.grad = torch.tensor([1.0, -1.0, 2.0, 0.0])
        >>> tracker.update() is None  # nothing to compare with yet
        True
        >>> w.grad = torch.tensor([3.0, 1.0, 1.0, 0.0])
        >>> tracker.update()
        0.75
    """

    def __init__(self, parameters: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
        keys: list[str] = []
        params: list[torch.Tensor] = []
        for index, item in enumerate(parameters):
            if isinstance(item, tuple):
                name, param = item
                keys.append(str(name))
            else:
                param = item
                keys.append(str(index))
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    f"GradientSignTracker tracks tensors; item {index} is {type(param).__name__}"
                )
            params.append(param)
        if len(set(keys)) != len(keys):
            raise ValueError("GradientSignTracker: parameter names must be unique")
        self._keys = keys
        self._params = params
        self._signs: list[torch.Tensor | None] = [None] * len(params)
        self.num_updates = 0  # calls to update()
        self.num_measured = 0  # calls that returned a value
        self.last_value: float | None = None

    @property
    def keys(self) -> list[str]:
        """The tracked parameters' keys, in tracking order."""
        return list(self._keys)

    @property
    def bytes_per_element(self) -> float:
        """Extra memory held per tracked element: the sign buffers' bytes over tracked elements."""
        held = sum(s.numel() * s.element_size() for s in self._signs if s is not None)
        tracked = sum(p.numel() for p in self._params)
        return held / tracked if tracked else 0.0

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the sign buffers right now."""
        return sum(s.numel() * s.element_size() for s in self._signs if s is not None)

    @torch.no_grad()
    def update(self) -> float | None:
        """Compare this step's gradient signs with each element's previous signs, then store them.

        Returns:
            The fraction of compared elements whose sign agreed, or ``None`` when no element had
            a previous sign to compare with.
        """
        self.num_updates += 1
        agree: dict[torch.device, torch.Tensor] = {}
        compared = 0
        for i, param in enumerate(self._params):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.to_dense()
            new = torch.sign(grad).to(torch.int8)
            old = self._signs[i]
            if old is not None and old.shape == new.shape:
                if old.device != new.device:  # the model moved; a one-off copy
                    old = old.to(new.device)
                count = torch.count_nonzero(torch.eq(new, old))
                if new.device in agree:
                    agree[new.device] += count
                else:
                    agree[new.device] = count
                compared += new.numel()
            # Keep the fresh buffer rather than copying into the old one: same memory, one pass less.
            self._signs[i] = new
        if compared == 0:
            self.last_value = None
            return None
        totals = list(agree.values())
        total = totals[0]
        for other in totals[1:]:
            total = total + other.to(total.device)
        value = total.item() / compared  # the one device-to-host sync of this call
        self.num_measured += 1
        self.last_value = value
        return value

    def reset(self) -> None:
        """Forget every stored sign (the next update returns ``None``)."""
        self._signs = [None] * len(self._params)
        self.last_value = None

    # ----------------------------------------------------------------- state

    def _stored(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, s) for k, s in zip(self._keys, self._signs, strict=True) if s is not None]

    def json_state(self) -> dict[str, Any]:
        """The JSON-safe part of the state: version, counters and which parameters have signs."""
        return {
            "version": _STATE_VERSION,
            "keys": list(self._keys),
            "has_signs": [k for k, _ in self._stored()],
            "numel": {k: s.numel() for k, s in self._stored()},
            "num_updates": self.num_updates,
            "num_measured": self.num_measured,
            "last_value": self.last_value,
        }

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """The stored signs as contiguous CPU ``int8`` tensors keyed by parameter key.

        The tensors are copies, ready for ``safetensors.torch.save_file``.
        """
        return {k: s.detach().to("cpu", copy=True).contiguous() for k, s in self._stored()}

    def load_state(self, json_state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore the state written by :meth:`json_state` and :meth:`tensor_state`.

        Raises:
            CheckpointError: the state does not belong to these parameters (other keys, shapes or
                version) or a sign tensor is missing or malformed.
        """
        version = json_state.get("version")
        if version != _STATE_VERSION:
            raise CheckpointError(
                f"gradient sign tracker state has version {version!r}; this gearshift reads "
                f"version {_STATE_VERSION}"
            )
        saved_keys = list(json_state.get("keys", []))
        if saved_keys != self._keys:
            missing = sorted(set(self._keys) - set(saved_keys))[:5]
            extra = sorted(set(saved_keys) - set(self._keys))[:5]
            raise CheckpointError(
                "gradient sign tracker state was saved for other parameters "
                f"({len(saved_keys)} saved, {len(self._keys)} tracked; missing {missing}, "
                f"unexpected {extra}); resume with the same model and LoRA settings"
            )
        index = {k: i for i, k in enumerate(self._keys)}
        signs: list[torch.Tensor | None] = [None] * len(self._params)
        for key in json_state.get("has_signs", []):
            if key not in tensors:
                raise CheckpointError(f"gradient sign tracker state lacks the signs of {key!r}")
            tensor = tensors[key]
            param = self._params[index[key]]
            if tensor.dtype != torch.int8 or tensor.numel() != param.numel():
                raise CheckpointError(
                    f"gradient sign tracker signs of {key!r} are {tensor.dtype} with "
                    f"{tensor.numel()} elements; expected int8 with {param.numel()}"
                )
            signs[index[key]] = tensor.to(param.device).reshape(param.shape).clone()
        self._signs = signs
        self.num_updates = int(json_state.get("num_updates", 0))
        self.num_measured = int(json_state.get("num_measured", 0))
        last = json_state.get("last_value")
        self.last_value = None if last is None else float(last)

    def state_dict(self) -> dict[str, Any]:
        """Both parts of the state: ``{"json": json_state(), "tensors": tensor_state()}``."""
        return {"json": self.json_state(), "tensors": self.tensor_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        self.load_state(state["json"], state.get("tensors", {}))
