"""LoRA as a model transform: PEFT adapters whose alphas follow the phase controller.

Checkpoints hold the adapter tensors only (the base is rebuilt from its source); the default
export is a PEFT adapter directory with the alphas in force, and ``merged=True`` folds the
adapters into the base weights for a full model directory.

An exported adapter names a base model that exists locally, so that it validates as an
``adapter`` directory and loads anywhere: the directory the base was loaded from (absolute), or,
for a base built from a config, a copy of it saved in ``base/`` inside the adapter directory
(``base_model_name_or_path: base``, relative to the adapter).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from gearshift.config.extensions import register_check
from gearshift.config.schema import LoraConfig
from gearshift.errors import Problem
from gearshift.phases import validate_phases_config
from gearshift.transforms.base import Transform, save_plain


def phases_with_lora_groups(phases: Any, groups: Any) -> Any:
    """The ``phases`` section with ``lora.groups`` as its group patterns, when it has none.

    LoRA groups are declared once, under ``lora.groups``; the controller uses the same ones.
    """
    if (isinstance(phases, Mapping) and isinstance(groups, Mapping) and groups
            and "phases" in phases and not phases.get("groups")):
        return {**phases, "groups": {"patterns": dict(groups)}}
    return phases


@register_check
def phases_problems(raw: Mapping[str, Any]) -> list[Problem]:
    """Every problem of the ``phases`` section, read with the LoRA groups it inherits."""
    phases = raw.get("phases") if isinstance(raw, Mapping) else None
    if not isinstance(phases, Mapping):
        return []
    lora = raw.get("lora")
    groups = lora.get("groups") if isinstance(lora, Mapping) else None
    return validate_phases_config(phases_with_lora_groups(phases, groups))


class LoraTransform(Transform):
    """Attach LoRA adapters (``lora`` config section) with :func:`gearshift.lora.attach_lora`.

    Args:
        config: The ``lora`` section.

    Example:
        >>> from gearshift.config.schema import LoraConfig
        >>> LoraTransform(LoraConfig(enabled=True, r=4)).strict
        False
    """

    name: ClassVar[str] = "lora"
    strict: ClassVar[bool] = False

    def __init__(self, config: LoraConfig) -> None:
        self.config = config

    def apply(self, model: nn.Module) -> nn.Module:
        from gearshift.lora import attach_lora

        c = self.config
        return attach_lora(model, r=c.r, alpha=c.alpha, target_modules=c.target_modules,
                           groups=c.groups, use_rslora=c.use_rslora, dropout=c.dropout)

    def checkpoint_tensors(self, model: nn.Module, names: set[str]) -> set[str]:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return names & trainable

    def phase_settings(self, phases: Any) -> tuple[Any, int | None]:
        return phases_with_lora_groups(phases, self.config.groups), self.config.r

    def set_alphas(self, model: nn.Module, controller: Any) -> dict[str, float] | None:
        from gearshift.lora import apply_phase_alpha

        return apply_phase_alpha(model, controller)

    def merge(self, model: nn.Module) -> nn.Module:
        from peft import PeftModel

        # PEFT folds each layer with the scaling in force, so the phase's alphas are kept.
        return model.merge_and_unload() if isinstance(model, PeftModel) else model

    def export(self, model: nn.Module, directory: Path, *, merged: bool) -> None:
        if merged:
            save_plain(self.merge(model), directory)
            return
        from gearshift.lora import export_adapter

        export_adapter(model, directory)  # type: ignore[arg-type]
        name_base(model, directory)


#: Where an adapter exported from a base built from a config keeps that base.
BASE_DIR = "base"


def name_base(model: nn.Module, directory: Path) -> None:
    """Point the exported adapter's ``base_model_name_or_path`` at a local base model.

    The base's own directory when it was loaded from one (absolute, so the adapter loads from
    any working directory); a base built from a config (no source at all) is saved in
    ``directory/base``. Any other name (a hub id) is left as PEFT wrote it, and so is the base
    of a module that is not a transformers model (no ``save_pretrained``).
    """
    from gearshift.lora import base_model_of

    base = base_model_of(model)
    source = getattr(getattr(base, "config", None), "_name_or_path", None)
    if isinstance(source, str) and source and (Path(source) / "config.json").is_file():
        named = str(Path(source).resolve())
    elif not source and hasattr(base, "save_pretrained"):
        # Unloading changes the modules in place: unload a copy, the trained model stays.
        save_plain(copy.deepcopy(model).unload(), directory / BASE_DIR)
        named = BASE_DIR
    else:
        return
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = named
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
