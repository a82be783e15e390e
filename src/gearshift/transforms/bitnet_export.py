"""Packed export of a ternary model, in the format plain transformers loads.

Every :class:`~gearshift.transforms.ternary.TernaryLinear` becomes transformers' own
``BitLinear`` (``transformers.integrations.bitnet``): its ``weight`` is the uint8 tensor of
``pack_weights`` (four 2-bit values per byte, ``out_features / 4`` rows) and its
``weight_scale`` is ``1 / mean|W|`` (``bitlinear`` divides by the scale; ``autobitlinear``
multiplies by it — this module writes ``bitlinear``). ``config.json`` gets a
``quantization_config`` with ``quant_method: bitnet``, ``linear_class: bitlinear``,
``quantization_mode: offline`` and ``modules_to_not_convert`` (every Linear layer left in full
precision), so ``AutoModelForCausalLM.from_pretrained(directory)`` rebuilds the same layers.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gearshift.errors import ModelError
from gearshift.transforms.base import save_plain
from gearshift.transforms.ternary import TernaryLinear, ternary_weight

LINEAR_CLASS = "bitlinear"


@dataclass(frozen=True)
class SizeReport:
    """Bytes on disk of an export, against the same model in fp16.

    Attributes:
        directory: The exported model directory.
        total_bytes: Size of its weight files.
        fp16_bytes: Every parameter of the model at 2 bytes.
        quantized_bytes: Packed weights and scales of the ternary layers.
        quantized_fp16_bytes: The same layers' weights at 2 bytes.
        layers: Number of ternary layers.
    """

    directory: Path
    total_bytes: int
    fp16_bytes: int
    quantized_bytes: int
    quantized_fp16_bytes: int
    layers: int

    def summary(self) -> str:
        """Two lines for the terminal."""
        mib = 1024 * 1024
        return (f"packed export: {self.directory} ({self.layers} ternary layers)\n"
                f"  size on disk: {self.total_bytes / mib:.3f} MiB vs {self.fp16_bytes / mib:.3f}"
                f" MiB in fp16 ({self.fp16_bytes / max(self.total_bytes, 1):.2f}x smaller); "
                f"ternary layers {self.quantized_bytes / mib:.3f} MiB vs "
                f"{self.quantized_fp16_bytes / mib:.3f} MiB "
                f"({self.quantized_fp16_bytes / max(self.quantized_bytes, 1):.2f}x smaller)")

    def as_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "total_bytes": self.total_bytes,
                "fp16_bytes": self.fp16_bytes, "quantized_bytes": self.quantized_bytes,
                "quantized_fp16_bytes": self.quantized_fp16_bytes, "layers": self.layers}


def packed_layer(layer: TernaryLinear) -> nn.Module:
    """Transformers' ``BitLinear`` holding ``layer``'s packed ternary weight and scale."""
    from transformers.integrations.bitnet import BitLinear, pack_weights

    t, inv = ternary_weight(layer.weight)
    dtype = layer.weight.dtype
    out = BitLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=layer.weight.device, dtype=dtype)
    # pack_weights adds 1 to its argument in place: give it a copy.
    out.weight = pack_weights(t.clone())
    out.weight_scale = inv.to(dtype)
    if layer.bias is not None:
        out.bias = layer.bias.detach().clone()
    return out


def export_packed(model: nn.Module, directory: Path, *, activation_bits: int = 8) -> SizeReport:
    """Write ``model`` (with its ternary layers) packed into the empty ``directory``.

    Raises:
        ModelError: When the model has no ternary layer, or its activations are not 8-bit
            (transformers' BitLinear quantizes activations to 8 bits).
    """
    if activation_bits != 8:
        raise ModelError(f"a packed export needs quantization.activation_bits: 8 (transformers' "
                         f"BitLinear quantizes activations to 8 bits; this run used "
                         f"{activation_bits}); retrain with 8, or keep the checkpoints")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]
    if not layers:
        raise ModelError("the model has no ternary layer to pack; apply the quantization "
                         "transform (quantization.method: bitnet_b158) first")
    fp16_bytes = 2 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    packed = copy.deepcopy(model)
    quantized_bytes = quantized_fp16 = 0
    for name, layer in layers:
        bit = packed_layer(layer)
        quantized_bytes += bit.weight.numel() + bit.weight_scale.numel() * \
            bit.weight_scale.element_size()
        quantized_fp16 += 2 * layer.weight.numel()
        packed.set_submodule(name, bit)
    keep = sorted(n for n, m in packed.named_modules() if isinstance(m, nn.Linear))
    config = getattr(packed, "config", None)
    if config is not None:
        from transformers import BitNetQuantConfig

        config.quantization_config = BitNetQuantConfig(
            modules_to_not_convert=keep, linear_class=LINEAR_CLASS,
            quantization_mode="offline")
    directory.mkdir(parents=True, exist_ok=True)
    save_plain(packed, directory)
    total = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return SizeReport(directory, total, fp16_bytes, quantized_bytes, quantized_fp16, len(layers))


def copy_export(src: Path, dst: Path) -> SizeReport:
    """Copy an existing packed export and describe it."""
    shutil.copytree(src, dst)
    from safetensors import safe_open

    total = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    fp16 = quantized = quantized_fp16 = layers = 0
    for path in dst.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = f.get_slice(key).get_shape()
                numel = int(torch.Size(shape).numel())
                if f.get_slice(key).get_dtype() == "U8" and key.endswith(".weight"):
                    layers += 1
                    quantized += numel + 4
                    quantized_fp16 += 2 * numel * 4
                    fp16 += 2 * numel * 4
                elif not key.endswith(".weight_scale"):
                    fp16 += 2 * numel
    return SizeReport(dst, total, fp16, quantized, quantized_fp16, layers)
