"""Phase driving, once: feed the controller once per optimizer step and apply what it decides.

Shared by the gearshift trainer, the Lightning callback and the Hugging Face callback. Each
optimizer step, the step's loss (token-weighted over its micro-batches, already summed over
ranks) and the gradient-sign stability (averaged over ranks) reach the controller, so every rank
transitions on the same step. A transition puts the phase's alphas into the model (through
whatever holds them: a model transform such as LoRA), asks the LR scheduler for the phase's LR
scale, is written as an event with the numbers that decided it, and is printed as one line
(:func:`transition_line`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gearshift.phases import PhaseScheduler
from gearshift.phases.rules import summary
from gearshift.signals import GradientSignTracker, reduce_signal

SIGNS = "grad_signs"

AlphaSetter = Callable[[PhaseScheduler], "dict[str, float] | None"]


def configured_alphas(controller: PhaseScheduler) -> dict[str, float]:
    """The current phase's alpha as configured, ``{"all": alpha}`` or per group."""
    alpha = controller.current_phase.alpha
    if isinstance(alpha, Mapping):
        return {str(k): float(v) for k, v in alpha.items()}
    return {"all": float(alpha)}


class PhaseDriver:
    """Owns the phase controller and the gradient-sign tracker of one run.

    With no controller (no ``phases`` section, or ``enabled: false``) it does nothing and saves
    nothing. Call :meth:`apply` once the model and the LR's owner are ready.

    Args:
        controller: The phase controller, or None.
        set_alphas: Puts the phase's alphas into the model; returns ``{group: alpha}`` in force,
            or None when the model holds no alphas (the configured ones are then reported).
        set_lr_scale: Asks the LR's owner for the phase's LR scale (None: the LR is not scaled).
        log_event: ``log_event(step, kind, **fields)`` for ``phase_transition`` records.
        say: Prints the transition line.
        model: Whose trainable parameters the gradient-sign tracker follows (None: no tracker).
    """

    def __init__(self, controller: PhaseScheduler | None, *,
                 set_alphas: AlphaSetter | None = None,
                 set_lr_scale: Callable[[float], None] | None = None,
                 log_event: Callable[..., None] | None = None,
                 say: Callable[[str], None] | None = None,
                 model: nn.Module | None = None) -> None:
        self.controller = controller
        self.set_alphas = set_alphas
        self.set_lr_scale = set_lr_scale
        self.log_event = log_event
        self.say = say
        self.alphas: dict[str, float] = {}
        self.tracker: GradientSignTracker | None = None
        if controller is not None and model is not None:
            self.tracker = GradientSignTracker(
                [(n, p) for n, p in model.named_parameters() if p.requires_grad])

    @property
    def enabled(self) -> bool:
        return self.controller is not None

    @property
    def lr_scale(self) -> float:
        return self.controller.current_lr_scale if self.controller is not None else 1.0

    def apply(self) -> None:
        """Put the current phase's alphas and LR scale in force."""
        if self.controller is None:
            return
        if self.set_lr_scale is not None:
            self.set_lr_scale(self.controller.current_lr_scale)
        alphas = self.set_alphas(self.controller) if self.set_alphas is not None else None
        self.alphas = alphas if alphas else configured_alphas(self.controller)

    def stability(self, accelerator: Any) -> float | None:
        """Gradient-sign agreement of this step (call between backward and zero_grad)."""
        if self.tracker is None:
            return None
        value = self.tracker.update()
        # Weighted by the elements each rank compared: equal under DDP (every rank holds every
        # gradient), each rank's own shard under FSDP.
        return reduce_signal(value, accelerator, weight=float(self.tracker.last_compared))

    def update(self, step: int, loss: float | None, stability: float | None) -> bool:
        """Feed one optimizer step; on a transition apply, record and print it."""
        if self.controller is None:
            return False
        if not self.controller.update(step, loss=loss, gradient_stability=stability):
            return False
        record = self.controller.transition_history[-1]
        self.apply()
        if self.log_event is not None:
            self.log_event(step, "phase_transition", **{
                k: v for k, v in record.items() if k != "step"}, alphas=self.alphas)
        if self.say is not None:
            self.say(transition_line(record))
        return True

    def metrics(self, stability: float | None) -> dict[str, Any]:
        """The phase, its index, the stability and the alphas in force, for the step's log."""
        if self.controller is None:
            return {}
        out: dict[str, Any] = {"phase": self.controller.current_phase.name,
                               "phase/index": self.controller.phase_index}
        if stability is not None:
            out["grad_stability"] = stability
        for group, alpha in self.alphas.items():
            out[f"alpha/{group}"] = alpha
        return out

    def after_step(self, step: int, loss: float, stability: float | None) -> dict[str, Any]:
        """:meth:`update`, then :meth:`metrics` (the trainer's once-per-step call)."""
        self.update(step, loss, stability)
        return self.metrics(stability)

    # ---------------------------------------------------------------- checkpoint state

    def json_state(self) -> dict[str, Any]:
        """The controller's and tracker's JSON state (empty when off)."""
        if self.controller is None:
            return {}
        out: dict[str, Any] = {"phases": self.controller.state_dict()}
        if self.tracker is not None:
            out[SIGNS] = self.tracker.json_state()
        return out

    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The tracker's sign buffers as ``{grad_signs: tensors}`` (empty when off)."""
        if self.tracker is None:
            return {}
        signs = self.tracker.tensor_state()
        return {SIGNS: signs} if signs else {}

    def load(self, state: Mapping[str, Any],
             tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> list[str]:
        """Restore controller and tracker; returns notes for the resume log."""
        if self.controller is None:
            return []
        notes = []
        if state.get("phases") is None:
            message = ("the checkpoint was written before phases were enabled: starting at "
                       f"phase 0 ({self.controller.current_phase.name})")
            warnings.warn(message, stacklevel=2)
            notes.append(message)
        else:
            self.controller.load_state_dict(state["phases"])
            signs = (tensors or {}).get(SIGNS)
            if SIGNS in state and signs is not None and self.tracker is not None:
                self.tracker.load_state(state[SIGNS], dict(signs))
            notes.append(f"phase {self.controller.current_phase.name} "
                         f"({self.controller.phase_index + 1}/{len(self.controller.phases)}), "
                         f"{self.controller.steps_in_phase} steps in")
        self.apply()
        return notes


def transition_line(record: Mapping[str, Any]) -> str:
    """One line describing a transition record of ``PhaseScheduler.transition_history``.

    The same line in the trainer, the Lightning and the Hugging Face callbacks; the LR scale of
    the new phase is in the ``phase_transition`` event (and the logged LR), not in the line.

    Example:
        >>> transition_line({"from_phase": "a", "to_phase": "b", "step": 70,
        ...                  "steps_in_phase": 70, "reason": "max_steps",
        ...                  "from_alpha": 8.0, "to_alpha": 16.0})
        'phase a -> b at step 70 after 70 steps (max_steps); alpha 8 -> 16'
    """
    return (f"phase {record['from_phase']} -> {record['to_phase']} at step {record['step']} "
            f"after {record['steps_in_phase']} steps ({summary(record)}); "
            f"alpha {_fmt(record['from_alpha'])} -> {_fmt(record['to_alpha'])}")


def _fmt(alpha: Any) -> str:
    if isinstance(alpha, dict):
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in alpha.items()) + "}"
    return f"{alpha:g}" if isinstance(alpha, int | float) else str(alpha)
