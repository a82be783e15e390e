"""What the Lightning and Hugging Face integrations share besides the phase driving itself
(:class:`gearshift.train.dynamics.PhaseDriver`, shared with the gearshift trainer).

Building the controller from a config or taking a ready one, finding the LoRA layers of a model,
putting the phase's alphas into them, and applying the phase's LR scale on top of a closed-form
LR scheduler (a gearshift scheduler is asked through ``set_scale``; it is the LR's one writer).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from gearshift.phases import PhaseScheduler, build_phase_scheduler
from gearshift.schedules import GearshiftLR

#: Param-group key holding the unscaled LR when no scheduler sets it (saved with the optimizer).
BASE_LR_KEY = "gearshift_base_lr"


def build_controller(config_or_scheduler: Any, rank: int | None) -> PhaseScheduler | None:
    """A ready :class:`PhaseScheduler` as it is, else one built from a ``phases:`` section.

    ``None`` (no section, or ``enabled: false``) gives ``None``: the callback then does nothing.
    """
    if isinstance(config_or_scheduler, PhaseScheduler):
        return config_or_scheduler
    return build_phase_scheduler(config_or_scheduler, rank=rank)


def config_json(config: Any) -> Any:
    """A JSON-safe copy of a ``phases:`` section, or ``None`` when it has none (an object)."""
    if config is None or isinstance(config, PhaseScheduler):
        return None
    dump = getattr(config, "model_dump", None)  # a validated pydantic schema model
    if callable(dump):
        return dump(mode="json")
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError):
        return None


def lora_target(module: nn.Module) -> nn.Module | None:
    """The module to give :func:`~gearshift.lora.apply_phase_alpha`: the first PEFT model inside
    ``module`` (``module`` itself included), else ``module`` when it holds LoRA layers, else
    ``None``."""
    from peft import PeftModel

    from gearshift.lora import lora_layers

    for sub in module.modules():
        if isinstance(sub, PeftModel):
            return sub
    return module if next(iter(lora_layers(module)), None) is not None else None


def lora_alphas(target: nn.Module | None, controller: PhaseScheduler) -> dict[str, float] | None:
    """Put the current phase's alphas into ``target``'s LoRA layers; ``{group: alpha}``, or None
    without LoRA layers (the phase driver then reports the configured alphas)."""
    if target is None:
        return None
    from gearshift.lora import apply_phase_alpha

    return apply_phase_alpha(target, controller) or None


def _set_lr(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


class PhaseLRScale:
    """Applies the phase's ``lr_scale`` on top of the scheduled LR (like the gearshift trainer).

    Exact only where the unscaled LR can be recomputed each time: a closed-form scheduler
    (:class:`~gearshift.schedules.GearshiftLR`, ``torch``'s ``LambdaLR`` — the Hugging Face
    default) or no scheduler at all (the unscaled LR is kept in the param group under
    :data:`BASE_LR_KEY`, so it is saved with the optimizer). Any other scheduler multiplies the
    previous LR, so scaling it would compound: a warning says the scale is not applied. Does
    nothing when no phase has an ``lr_scale`` other than 1.
    """

    def __init__(self, controller: PhaseScheduler | None) -> None:
        self.active = controller is not None and any(
            p.lr_scale != 1.0 for p in controller.phases)
        self._warned = False

    def apply(self, optimizer: Any, scheduler: Any, scale: float) -> None:
        """Set every param group's LR to its unscaled value times ``scale``."""
        if not self.active or optimizer is None:
            return
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
        if isinstance(scheduler, GearshiftLR):
            scheduler.set_scale("phase", scale)  # the LR's one writer; saved in its state
            return
        groups = optimizer.param_groups
        if scheduler is None:
            bases = [float(g.setdefault(BASE_LR_KEY, float(g["lr"]))) for g in groups]
        elif isinstance(scheduler, LambdaLR):
            bases = [float(lr) for lr in scheduler.get_last_lr()]
        else:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"the phases set lr_scale, but the LR scheduler {type(scheduler).__name__} "
                    "computes each LR from the previous one, so scaling it would compound: the "
                    "phase LR scale is NOT applied. Use a gearshift schedule "
                    "(configure_lr_scheduler / build_lr_scheduler) or a LambdaLR.",
                    stacklevel=3,
                )
            return
        for group, base in zip(groups, bases, strict=True):
            value = base * scale
            if float(group["lr"]) != value:
                _set_lr(group, value)
