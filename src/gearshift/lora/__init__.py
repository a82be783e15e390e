"""LoRA through PEFT: attach, group, steer with the phase controller's alpha, export.

* :func:`attach_lora` wraps a model with LoRA (Linear and Conv1d/2d/3d targets) and records its
  groups (by layer type, or by module-name regex).
* :func:`lora_layers` / :func:`lora_groups` list the LoRA layers and their groups.
* :func:`apply_phase_alpha` sets each layer's scale from the phase controller (after every
  transition and on resume).
* :func:`export_adapter` writes a PEFT adapter directory whose ``adapter_config.json`` carries the
  alphas in force, so plain PEFT loading reproduces the trained model.
"""

from gearshift.lora.alpha import AlphaSource, adapter_alphas, apply_phase_alpha, export_adapter
from gearshift.lora.attach import attach_lora
from gearshift.lora.groups import TYPE_GROUPS, GroupSpec, base_model_of, lora_groups, lora_layers

__all__ = [
    "TYPE_GROUPS",
    "AlphaSource",
    "GroupSpec",
    "adapter_alphas",
    "apply_phase_alpha",
    "attach_lora",
    "base_model_of",
    "export_adapter",
    "lora_groups",
    "lora_layers",
]
