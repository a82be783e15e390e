"""A checkpoint's files as bytes in host memory, taken at one step before anything is written.

A snapshot is what lets training go on while a checkpoint is written: every tensor file is
serialized by ``safetensors`` into memory and every JSON payload encoded, so the background
writer never touches a live tensor. Taking it costs one copy of the state; nothing else blocks.

The memory of a tensor file is kept for the next snapshot when its layout (names, dtypes, shapes,
metadata) is unchanged, which is every save of a run after the first. The next snapshot then
copies each tensor into its place in that buffer, at the byte offsets that ``safetensors``' own
header gives, so the bytes are exactly what ``safetensors.torch.save`` would produce; copying
into memory that is already mapped is several times faster than serializing into fresh memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import _remove_duplicate_names, save
from torch import nn

_LITTLE_ENDIAN = sys.byteorder == "little"  # safetensors stores little-endian bytes


@dataclass
class TensorImage:
    """One safetensors file in memory.

    Attributes:
        key: The layout (metadata; name, dtype and shape of every tensor) the bytes hold.
        data: The file's bytes as serialized by safetensors.
        buffer: The same bytes in writable memory once :meth:`keep` ran, refilled in place by the
            next snapshot of the same layout.
        spans: Tensor name to its (start, end) byte offsets in the file.
    """

    key: tuple[Any, ...]
    data: bytes | None
    spans: dict[str, tuple[int, int]]
    buffer: torch.Tensor | None = None
    pinned: bool = False

    def view(self) -> memoryview:
        """The file's bytes without a copy."""
        if self.buffer is not None:
            return memoryview(self.buffer.numpy()).cast("B")
        assert self.data is not None
        return memoryview(self.data)

    def keep(self) -> None:
        """Move the bytes into writable memory for the next snapshot (off the training path)."""
        if self.buffer is not None or self.data is None or not _LITTLE_ENDIAN:
            return
        buffer = torch.empty(len(self.data), dtype=torch.uint8, pin_memory=self.pinned)
        buffer.numpy()[:] = np.frombuffer(self.data, dtype=np.uint8)
        self.buffer, self.data = buffer, None

    def refill(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (same layout) into :attr:`buffer` at safetensors' offsets."""
        assert self.buffer is not None
        on_gpu = False
        for name, tensor in tensors.items():
            start, end = self.spans[name]
            target = self.buffer[start:end].view(tensor.dtype).view(tensor.shape)
            on_gpu = on_gpu or tensor.device.type == "cuda"
            target.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
        if on_gpu:
            torch.cuda.synchronize()


def _layout_key(tensors: Mapping[str, torch.Tensor],
                metadata: Mapping[str, str] | None) -> tuple[Any, ...]:
    return (tuple(sorted((metadata or {}).items())),
            tuple((name, str(t.dtype), tuple(t.shape)) for name, t in sorted(tensors.items())))


def _host_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, non-overlapping tensors that safetensors accepts (copies only if needed)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        host = tensor.detach().to("cpu").contiguous()
        storage = host.untyped_storage().data_ptr() if host.numel() else 0
        if storage and storage in seen:
            host = host.clone()  # two names of one storage (tied weights in a mapping)
        seen.add(storage)
        out[name] = host
    return out


def serialize_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                      reuse: TensorImage | None = None) -> TensorImage:
    """Serialize ``tensors`` as one safetensors file in memory.

    Args:
        tensors: Name to tensor (any device, any strides).
        metadata: The header's ``__metadata__`` (e.g. tied names), or None.
        reuse: The image of the previous snapshot of this file; refilled in place when its layout
            is the same.

    Returns:
        The image; ``reuse`` itself when it was refilled.
    """
    key = _layout_key(tensors, metadata)
    if reuse is not None and reuse.key == key and reuse.buffer is not None:
        try:
            reuse.refill(tensors)
            return reuse
        except RuntimeError:
            pass  # an offset not aligned to its dtype cannot be viewed: serialize afresh
    data = save(_host_tensors(tensors), metadata=dict(metadata) if metadata else None)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    spans = {name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
             for name, info in header.items() if name != "__metadata__"}
    pinned = torch.cuda.is_available() and any(t.device.type == "cuda" for t in tensors.values())
    return TensorImage(key=key, data=data, spans=spans, pinned=pinned)


def model_tensors(model: nn.Module | Mapping[str, torch.Tensor],
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors ``model.safetensors`` holds, and its metadata.

    A module is stored as ``safetensors.torch.save_model`` stores it: one name of each group of
    tied weights, the others recorded in the metadata. A mapping (e.g. adapter-only weights) is
    stored as given.

    Raises:
        TypeError: If ``model`` is neither a module nor a mapping of str to tensors.
    """
    if isinstance(model, nn.Module):
        state = model.state_dict()
        metadata: dict[str, str] = {}
        for kept, removed in _remove_duplicate_names(state).items():
            for name in removed:
                metadata[name] = kept
                del state[name]
        return state, metadata or None
    if not isinstance(model, Mapping):
        raise TypeError(
            f"model must be an nn.Module or a mapping of str to tensors, got {type(model).__name__}"
        )
    for name, tensor in model.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"model mapping must map str to tensors; {name!r} maps to {type(tensor).__name__}"
            )
    return dict(model), None


@dataclass
class Snapshot:
    """Every file of one checkpoint, as bytes in host memory.

    Attributes:
        step: The step the state was taken at.
        tensors: File name to its safetensors image.
        payloads: File name to its JSON bytes.
    """

    step: int
    tensors: dict[str, TensorImage] = field(default_factory=dict)
    payloads: dict[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes the checkpoint's files hold."""
        return (sum(len(image.view()) for image in self.tensors.values())
                + sum(len(data) for data in self.payloads.values()))

    def files(self) -> list[tuple[str, memoryview]]:
        """(name, bytes) of every file, the largest first (so hashing starts on it first)."""
        out = [(name, image.view()) for name, image in self.tensors.items()]
        out += [(name, memoryview(data)) for name, data in self.payloads.items()]
        return sorted(out, key=lambda item: -len(item[1]))
