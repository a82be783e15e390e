"""Continuing a saved LoRA adapter: ``model.path`` names an adapter directory.

The task builds the base model the adapter names (``gearshift.models.load_base_model``); this
transform puts the adapter on it with PEFT, trainable, and from then on it is LoRA like any
other: checkpoints hold its tensors, the phase controller sets its alphas, and the export is an
adapter directory (or, merged, a full model).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from gearshift.config.schema import LoraConfig
from gearshift.errors import ModelError
from gearshift.transforms.lora import LoraTransform


class AdapterTransform(LoraTransform):
    """Load the PEFT LoRA adapter in ``path`` onto the model and keep training it.

    Its rank, alpha, targets and dropout are the adapter's own (``adapter_config.json``); from
    the ``lora`` section only ``groups`` is used (the phase controller's groups).

    Args:
        path: The adapter directory.
        config: The ``lora`` section.

    Example:
        >>> AdapterTransform("runs/sft-20260101-120000/final", LoraConfig())  # doctest: +SKIP
    """

    name: ClassVar[str] = "lora"

    def __init__(self, path: str | Path, config: LoraConfig) -> None:
        super().__init__(config)
        self.path = Path(path)
        try:
            self.adapter_config: dict[str, Any] = json.loads(
                (self.path / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {self.path / 'adapter_config.json'}: {exc}") from None
        kind = self.adapter_config.get("peft_type")
        if kind != "LORA":
            raise ModelError(f"{self.path} holds a {kind} adapter; gearshift continues LoRA "
                             "adapters only (peft_type: LORA)")

    @property
    def rank(self) -> int:
        return int(self.adapter_config.get("r", self.config.r))

    def apply(self, model: nn.Module) -> nn.Module:
        from gearshift.lora.groups import compile_groups, store_groups
        from gearshift.models import adapter_base, load_adapter

        compile_groups(self.config.groups)  # a bad group regex is a config error
        c, a = self.config, self.adapter_config
        if c.enabled and (c.r != a.get("r") or _names(c.target_modules) != _names(
                a.get("target_modules"))):
            warnings.warn(f"model.path is a LoRA adapter ({self.path}): it is continued with "
                          f"its own r={a.get('r')} and target_modules={a.get('target_modules')}; "
                          "lora.r and lora.target_modules are not used", stacklevel=2)
        peft_model = load_adapter(model, self.path, trainable=True)
        # PEFT reads the base's config again on save; a path relative to the adapter would be
        # looked up in the working directory.
        for adapter_config in peft_model.peft_config.values():
            adapter_config.base_model_name_or_path = str(adapter_base(self.path).resolve())
        store_groups(peft_model, c.groups)
        return peft_model

    def phase_settings(self, phases: Any) -> tuple[Any, int | None]:
        phases, _ = super().phase_settings(phases)
        return phases, self.rank


def _names(target_modules: Any) -> Any:
    """Target modules compared as a set of names (PEFT saves a list as a set's order), or as
    the regex string they are."""
    return set(target_modules) if isinstance(target_modules, list | tuple | set) else target_modules
