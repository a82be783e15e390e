"""Phases in the loop: feed the controller once per optimizer step, apply what it decides.

Each optimizer step, the step's loss (token-weighted over its micro-batches, already summed over
ranks) and the gradient-sign stability (averaged over ranks) reach the controller, so every rank
transitions on the same step. A transition sets the LoRA alphas, scales the LR, is written to
``events.jsonl`` with the numbers that decided it, and is printed as one line.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gearshift.config import Config
from gearshift.config.loader import phases_with_lora_groups
from gearshift.phases import PhaseScheduler, build_phase_scheduler
from gearshift.schedules import GearshiftLR
from gearshift.signals import GradientSignTracker, reduce_signal
from gearshift.train.logger import RunLogger

SIGNS = "grad_signs"


class PhaseDriver:
    """Owns the phase controller and the gradient-sign tracker of one run.

    With no ``phases`` section (or ``enabled: false``) it does nothing and saves nothing.
    """

    def __init__(self, config: Config, model: nn.Module, scheduler: GearshiftLR,
                 logger: RunLogger | None, say: Callable[[str], None]) -> None:
        rank = config.lora.r if config.lora.enabled else None
        phases = phases_with_lora_groups(config.phases, config.lora.groups)
        self.controller: PhaseScheduler | None = build_phase_scheduler(phases, rank=rank)
        self.model = model
        self.scheduler = scheduler
        self.lora = config.lora.enabled
        self.logger = logger
        self.say = say
        self.alphas: dict[str, float] = {}
        self.tracker = None
        if self.controller is not None:
            self.tracker = GradientSignTracker(
                [(n, p) for n, p in model.named_parameters() if p.requires_grad])
            self.apply()

    @property
    def enabled(self) -> bool:
        return self.controller is not None

    @property
    def lr_scale(self) -> float:
        return self.controller.current_lr_scale if self.controller is not None else 1.0

    def apply(self) -> None:
        """Put the current phase's alphas into the LoRA layers and its LR scale in force."""
        if self.controller is None:
            return
        self.scheduler.set_scale("phase", self.controller.current_lr_scale)
        if self.lora:
            from gearshift.lora import apply_phase_alpha

            self.alphas = apply_phase_alpha(self.model, self.controller)
        else:
            alpha = self.controller.current_phase.alpha
            self.alphas = dict(alpha) if isinstance(alpha, dict) else {"all": float(alpha)}

    def stability(self, accelerator: Any) -> float | None:
        """Gradient-sign agreement of this step (call between backward and zero_grad)."""
        if self.tracker is None:
            return None
        return reduce_signal(self.tracker.update(), accelerator)

    def after_step(self, step: int, loss: float, stability: float | None) -> dict[str, Any]:
        """Feed the controller; on a transition apply and report it. Returns metrics to log."""
        if self.controller is None:
            return {}
        if self.controller.update(step, loss=loss, gradient_stability=stability):
            record = self.controller.transition_history[-1]
            self.apply()
            if self.logger is not None:
                self.logger.log_event(step, "phase_transition", **{
                    k: v for k, v in record.items() if k != "step"}, alphas=self.alphas)
            self.say(f"phase {record['from_phase']} -> {record['to_phase']} at step {step} "
                     f"after {record['steps_in_phase']} steps ({_why(record)}); "
                     f"alpha {_fmt(record['from_alpha'])} -> {_fmt(record['to_alpha'])}")
        metrics: dict[str, Any] = {"phase": self.controller.current_phase.name,
                                   "phase/index": self.controller.phase_index}
        if stability is not None:
            metrics["grad_stability"] = stability
        for group, alpha in self.alphas.items():
            metrics[f"alpha/{group}"] = alpha
        return metrics

    # ---------------------------------------------------------------- checkpoint state

    def json_state(self) -> dict[str, Any]:
        """The controller's and tracker's JSON state for trainer_state (empty when off)."""
        if self.controller is None or self.tracker is None:
            return {}
        return {"phases": self.controller.state_dict(), SIGNS: self.tracker.json_state()}

    def sign_tensors(self) -> dict[str, torch.Tensor] | None:
        """The tracker's sign buffers for ``grad_signs.safetensors`` (None when off)."""
        return self.tracker.tensor_state() if self.tracker is not None else None

    def load(self, trainer_state: dict[str, Any], tensors: dict[str, torch.Tensor] | None,
             ) -> list[str]:
        """Restore controller and tracker; returns notes for the resume log."""
        if self.controller is None:
            return []
        notes = []
        if "phases" not in trainer_state:
            message = ("the checkpoint was written before phases were enabled: starting at "
                       f"phase 0 ({self.controller.current_phase.name})")
            warnings.warn(message, stacklevel=2)
            notes.append(message)
        else:
            self.controller.load_state_dict(trainer_state["phases"])
            if SIGNS in trainer_state and tensors is not None and self.tracker is not None:
                self.tracker.load_state(trainer_state[SIGNS], tensors)
            notes.append(f"phase {self.controller.current_phase.name} "
                         f"({self.controller.phase_index + 1}/{len(self.controller.phases)}), "
                         f"{self.controller.steps_in_phase} steps in")
        self.apply()
        return notes


_DECIDING = {"improvement_rate": "<", "rising_rate": "<", "cv": "<=", "r2": ">=",
             "gradient_stability": ">="}


def _why(record: dict[str, Any]) -> str:
    """The numbers that decided a transition, in one short clause."""
    parts = [f"{c['criterion']} {c['value']:.3g} {_DECIDING[c['criterion']]} {c['threshold']:.3g}"
             for c in record.get("criteria") or []
             if c.get("criterion") in _DECIDING and c.get("result") == "pass"
             and isinstance(c.get("value"), int | float) and c.get("threshold") is not None]
    return f"{record['reason']}: {', '.join(parts)}" if parts else str(record["reason"])


def _fmt(alpha: Any) -> str:
    if isinstance(alpha, dict):
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in alpha.items()) + "}"
    return f"{alpha:g}" if isinstance(alpha, int | float) else str(alpha)
