"""Model transforms: what changes a model before training, and how it is saved and exported.

:func:`build_transforms` reads the config and returns the chain in its declared order (LoRA
and BitNet
ternary quantization; the quantized base goes *before* LoRA, so adapters sit on top of it).
"""

from __future__ import annotations

from gearshift.config import Config
from gearshift.transforms.base import Transform, TransformChain, save_plain
from gearshift.transforms.bitnet import BitNetTransform
from gearshift.transforms.lora import LoraTransform

#: The order transforms are applied in, whichever sections enable them.
ORDER: tuple[str, ...] = ("bitnet", "lora")


def build_transforms(config: Config) -> TransformChain:
    """The transforms ``config`` enables, in :data:`ORDER`."""
    found: dict[str, Transform] = {}
    if config.quantization.method == "bitnet_b158":
        found["bitnet"] = BitNetTransform(config.quantization)
    if config.lora.enabled:
        found["lora"] = LoraTransform(config.lora)
    return TransformChain(found[name] for name in ORDER if name in found)


__all__ = ["ORDER", "BitNetTransform", "LoraTransform", "Transform", "TransformChain", "build_transforms",
           "save_plain"]
