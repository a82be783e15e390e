"""Model transforms: what changes a model before training, and how it is saved and exported.

:func:`build_transforms` reads the config and returns the chain in its declared order (BitNet
ternary quantization, then LoRA: adapters sit on top of the quantized base). When
``model.path`` is a LoRA adapter directory the LoRA slot continues that adapter
(:class:`AdapterTransform`) instead of attaching a new one.
"""

from __future__ import annotations

from gearshift.config import Config
from gearshift.models import is_adapter_dir
from gearshift.transforms.adapter import AdapterTransform
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
    if is_adapter_dir(config.model.path):
        found["lora"] = AdapterTransform(config.model.path, config.lora)  # type: ignore[arg-type]
    elif config.lora.enabled:
        found["lora"] = LoraTransform(config.lora)
    return TransformChain(found[name] for name in ORDER if name in found)


__all__ = ["ORDER", "AdapterTransform", "BitNetTransform", "LoraTransform", "Transform",
           "TransformChain", "build_transforms", "save_plain"]
