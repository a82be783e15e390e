"""Gradient-sign agreement: how many gradient elements keep their sign from one step to the next.

A run whose gradients point the same way step after step is making steady progress on the same
directions; a run whose signs flip at random is mostly following noise. The phase controller uses
this fraction ("gradient stability") as one of its exit criteria.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from gearshift.errors import CheckpointError

try:
    from torch._utils import _flatten_dense_tensors
except ImportError:  # pragma: no cover - a private helper (DDP's bucketing uses it)

    def _flatten_dense_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

__all__ = ["GradientSignTracker"]

_STATE_VERSION = 1
_INT32_SAFE = 2**31 - 1  # a count of at most this many elements fits an int32 sum
_NONES = itertools.repeat(None)
_SHAPE = operator.attrgetter("shape")
_IS_SPARSE = operator.attrgetter("is_sparse")


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' elements in one 1-D tensor (a view for a single contiguous tensor).

    One call instead of a ``reshape`` per tensor and a ``cat`` (``_flatten_dense_tensors`` is
    what DDP's bucketing uses); mixed dtypes promote as in ``torch.cat``.
    """
    return _flatten_dense_tensors(tensors)


def _local(grad: torch.Tensor | None) -> torch.Tensor | None:
    """This process's shard of a sharded (FSDP ``DTensor``) gradient; any other as it is."""
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _count_equal(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """How many elements of ``new`` equal ``old``, as a tensor on their device (no host read)."""
    same = torch.eq(new, old)
    if same.numel() <= _INT32_SAFE:
        return same.sum(dtype=torch.int32)  # about twice as fast as count_nonzero on CPU
    return torch.count_nonzero(same)


def _total(counts: list[torch.Tensor]) -> torch.Tensor:
    """One device's counts added up on the device: in ``int64``, as they pass int32 on big
    models (a single count is returned as is: it fits its own dtype)."""
    if len(counts) == 1:
        return counts[0]
    return torch.stack(counts).sum(dtype=torch.int64)


class _Pack:
    """The signs of several small parameters on one device, held in one flat ``int8`` buffer.

    ``views[k]`` — a view of ``flat`` shaped like parameter ``members[k]`` — is the very tensor
    the tracker stores as that parameter's signs, so the per-parameter state and the flat buffer
    are the same memory. One update of a pack is a handful of operations on the flat buffer
    instead of a handful per parameter.
    """

    __slots__ = (
        "device", "flat", "members", "numels", "params", "pieces", "shapes", "total", "views",
    )

    def __init__(self, device: torch.device, members: list[int], params: list[torch.Tensor],
                 signs: list[torch.Tensor]):
        self.device = device
        self.members = members
        self.params = params
        self.shapes = [s.shape for s in signs]
        self.numels = [s.numel() for s in signs]
        self.total = sum(self.numels)
        self.flat = torch.cat([s.reshape(-1) for s in signs])  # a fresh buffer, even for one
        self.pieces = list(torch.split(self.flat, self.numels))  # 1-D views, in member order
        self.views = [p.view(shape) for p, shape in zip(self.pieces, self.shapes, strict=True)]


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

    Cost: one ``int8`` sign per tracked element, allocated lazily on the parameter's device the
    first time the parameter has a gradient (1 byte per element, :attr:`bytes_per_element`), and
    exactly one device-to-host transfer per call that compares anything (the count is accumulated
    on the device and read once). Small parameters (up to :attr:`small_numel` elements, such as
    LoRA adapters and norms) have their signs packed, per device, into flat buffers of at most
    :attr:`pack_numel` elements: their gradients are gathered with one concatenation and
    compared in one pass, so an update costs a few operations per buffer rather than per
    tensor. Each such parameter's signs are still its own tensor — a view of the flat buffer — so
    the state and its format are the same. A step that changes which small parameters are known
    (a first gradient, a parameter moved to another device) is handled one tensor at a time and
    then repacked.

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

    #: Parameters with at most this many elements are packed into flat buffers.
    small_numel: int = 1 << 16
    #: Elements per flat buffer, at most (bounds the temporary copies of one pass).
    pack_numel: int = 1 << 18

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
        self._unpack()
        self.num_updates = 0  # calls to update()
        self.num_measured = 0  # calls that returned a value
        self.last_value: float | None = None
        self.last_compared = 0

    @property
    def keys(self) -> list[str]:
        """The tracked parameters' keys, in tracking order."""
        return list(self._keys)

    @property
    def bytes_per_element(self) -> float:
        """Extra memory held per tracked element: the sign buffers' bytes over tracked elements."""
        tracked = sum(p.numel() for p in self._params)
        return self.memory_bytes / tracked if tracked else 0.0

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
        signs = self._signs
        counts: dict[torch.device, list[torch.Tensor]] = {}  # agreeing elements, on the device
        compared = 0
        padding = 0  # elements counted as agreeing that stand for absent gradients
        loose = [(i, g) for i, p in self._loose if (g := _local(p.grad)) is not None]
        broken: list[_Pack] = []
        for pack in self._packs:
            got = [_local(p.grad) for p in pack.params]
            if not any(map(operator.is_not, got, _NONES)):
                continue  # no member has a gradient this step
            gathered = self._gather(pack, got)
            if gathered is None:
                broken.append(pack)
                loose += [(i, g) for i, g in zip(pack.members, got, strict=True) if g is not None]
                continue
            new, absent = gathered
            count = _count_equal(new, pack.flat)
            pack.flat.copy_(new)
            counts.setdefault(pack.device, []).append(count)
            compared += pack.total - absent
            padding += absent

        fresh: list[int] = []  # small parameters to (re)pack after this step
        small = self.small_numel
        for i, grad in loose:
            if grad.is_sparse:
                grad = grad.to_dense()
            elif grad.numel() <= small:
                fresh.append(i)
            new = torch.sign(grad).to(torch.int8)
            old = signs[i]
            if old is not None and old.shape == new.shape:
                if old.device != new.device:  # the model moved; a one-off copy
                    old = old.to(new.device)
                counts.setdefault(new.device, []).append(_count_equal(new, old))
                compared += new.numel()
            # Keep the fresh buffer rather than copying into the old one: same memory, one pass less.
            signs[i] = new

        if fresh or broken:
            # Members of a broken pack that had no gradient still hold views of its buffer:
            # repack them too, so that no view keeps the old buffer alive.
            for pack in broken:
                fresh.extend(
                    i for i, view in zip(pack.members, pack.views, strict=True) if signs[i] is view
                )
            self._repack(fresh, broken)
        # Elements compared by this process: with a sharded model each process compares its own
        # shard, and the cross-rank value is the mean weighted by these counts.
        self.last_compared = compared
        if compared == 0:
            self.last_value = None
            return None
        totals = [_total(c) for c in counts.values()]
        total = totals[0]
        for other in totals[1:]:  # devices: rare, and never a host read
            total = total.to(torch.int64) + other.to(total.device)
        value = (total.item() - padding) / compared  # the one device-to-host sync of this call
        self.num_measured += 1
        self.last_value = value
        return value

    def _gather(
        self, pack: _Pack, got: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, int] | None:
        """The signs of this step's gradients of a pack's members: flat, ``int8``, member order.

        A member without a gradient is stood in for by its stored signs: ``sign()`` keeps them,
        so they are written back unchanged and agree with themselves; the caller subtracts
        these ``absent`` elements from the count. Returns ``(signs, absent)``, or ``None`` when
        the pack cannot be used this step: a member's stored signs are no longer its view (they
        were replaced), or a gradient is sparse, has another shape or lives on another device.
        """
        signs = self._signs
        if not all(map(operator.is_, [signs[i] for i in pack.members], pack.views)):
            return None
        absent = 0
        if all(map(operator.is_not, got, _NONES)):
            present = cast(list[torch.Tensor], got)
            inputs, shapes = present, pack.shapes
        else:
            present, inputs, shapes = [], [], []
            for grad, piece, shape in zip(got, pack.pieces, pack.shapes, strict=True):
                if grad is None:
                    inputs.append(piece)
                    absent += piece.numel()
                else:
                    inputs.append(grad)
                    present.append(grad)
                    shapes.append(shape)
        if any(map(_IS_SPARSE, present)) or list(map(_SHAPE, present)) != shapes:
            return None
        try:
            flat = _flatten(inputs)
        except RuntimeError:  # gradients on different devices
            return None
        if flat.device != pack.device:  # all of them moved (model.to(...)): repack there
            return None
        # Several inputs were concatenated into a fresh buffer, which sign() may overwrite; a
        # single one may come back as a view of the gradient itself.
        signs_f = flat.sign_() if len(inputs) > 1 else torch.sign(flat)
        return signs_f.to(torch.int8), absent

    def _unpack(self) -> None:
        """Forget the packing: every parameter is handled alone until the next repack."""
        self._packs: list[_Pack] = []
        self._loose: list[tuple[int, torch.Tensor]] = list(enumerate(self._params))

    def _repack(self, indices: list[int], broken: list[_Pack]) -> None:
        """Pack the signs of ``indices`` with the packs already on their devices.

        ``broken`` packs are dropped; their members must be in ``indices`` or no longer hold
        views of them. The signs are copied into fresh flat buffers and every packed
        parameter's signs become views of them, so no old buffer stays referenced.
        """
        signs = self._signs
        wanted: dict[torch.device, set[int]] = {}
        for i in indices:
            sign = signs[i]
            if sign is not None:
                wanted.setdefault(sign.device, set()).add(i)
        packs: list[_Pack] = []
        for pack in self._packs:
            if any(pack is b for b in broken):
                continue
            if pack.device in wanted:
                wanted[pack.device].update(pack.members)  # merged: one buffer, not many
            else:
                packs.append(pack)
        limit = self.pack_numel
        for device, members in wanted.items():
            group: list[int] = []
            size = 0
            for i in sorted(members):
                numel = signs[i].numel()
                if group and size + numel > limit:
                    packs.append(self._pack(device, group))
                    group, size = [], 0
                group.append(i)
                size += numel
            if group:
                packs.append(self._pack(device, group))
        packed = {i for pack in packs for i in pack.members}
        self._packs = packs
        self._loose = [(i, p) for i, p in enumerate(self._params) if i not in packed]

    def _pack(self, device: torch.device, members: list[int]) -> _Pack:
        pack = _Pack(device, members, [self._params[i] for i in members],
                     [self._signs[i] for i in members])
        for i, view in zip(members, pack.views, strict=True):
            self._signs[i] = view
        return pack

    def reset(self) -> None:
        """Forget every stored sign (the next update returns ``None``)."""
        self._signs = [None] * len(self._params)
        self._unpack()
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

        The tensors are copies, ready for ``safetensors.torch.save_file``. The signs of a sharded
        (FSDP) parameter are gathered whole: a collective call then, made by every rank.
        """
        out = {}
        for key, signs in self._stored():
            param = self._params[self._keys.index(key)]
            if isinstance(param, DTensor):
                signs = DTensor.from_local(signs.reshape(param.to_local().shape),
                                           param.device_mesh, param.placements,
                                           shape=param.shape, stride=param.stride()).full_tensor()
            out[key] = signs.detach().to("cpu", copy=True).contiguous()
        return out

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
            if bool(torch.any((tensor < -1) | (tensor > 1))):  # read once, on load
                raise CheckpointError(
                    f"gradient sign tracker signs of {key!r} hold values other than -1, 0 and +1"
                )
            full = tensor.to(param.device).reshape(param.shape)
            if isinstance(param, DTensor):  # keep this process's shard of the whole signs
                full = distribute_tensor(full, param.device_mesh, param.placements).to_local()
            signs[index[key]] = full.clone()
        self._signs = signs
        self._unpack()  # packed again by the next update
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
