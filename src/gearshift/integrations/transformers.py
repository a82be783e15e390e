"""gearshift's phase controller in a Hugging Face ``Trainer``.

:class:`PhaseSchedulerTrainerCallback` feeds the controller once per optimizer step with the step's
training loss and gradient-sign stability, puts each phase's LoRA alphas (and LR scale) in force,
and keeps its state in the ``Trainer``'s checkpoints, so ``train(resume_from_checkpoint=...)``
continues with the same decisions as a run that never stopped.

**Where the loss comes from.** A ``TrainerCallback`` is never shown the loss of a step: the
``Trainer`` only hands it over in the logs. Two sources, in this order:

1. :class:`PhaseLossMixin` (``class MyTrainer(PhaseLossMixin, Trainer)``) records what
   ``Trainer.training_step`` returns for each micro-batch; their sum is the step's loss, the
   same number the ``Trainer`` logs, on every step whatever ``logging_steps`` is.
2. Otherwise the ``"loss"`` the ``Trainer`` logs for the step (``on_log``, which comes right after
   ``on_step_end`` and before the step's checkpoint). With ``logging_steps=1`` (and
   ``logging_strategy="steps"``) that is every step's loss, averaged over ranks by the
   ``Trainer``. With a larger ``logging_steps`` the controller sees the mean loss of each logging
   interval on logging steps and no loss on the others (steps still count towards ``min_steps``
   / ``max_steps``); a warning says so once.

Example:
    >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
    >>> phases = {"window": 100, "phases": [{"name": "foundation", "alpha": 8},
    ...                                     {"name": "emphasis", "alpha": 16}]}
    >>> trainer = Trainer(model=peft_model, args=TrainingArguments("out", logging_steps=1),
    ...                   train_dataset=data,
    ...                   callbacks=[PhaseSchedulerTrainerCallback(phases)])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from torch import Tensor, nn

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState, TrainerControl, TrainerState
    from transformers.training_args import TrainingArguments
except ImportError as exc:  # pragma: no cover - transformers is a core dependency
    raise ImportError(
        f"gearshift.integrations.transformers needs transformers, which could not be imported "
        f"({exc}). Install it with: pip install 'transformers>=4.45'"
    ) from exc

from gearshift.errors import CheckpointError, ConfigError, Problem
from gearshift.integrations._common import (
    PhaseLRScale,
    build_controller,
    config_json,
    lora_alphas,
    lora_target,
)
from gearshift.phases import PhaseScheduler
from gearshift.signals import GradientSignTracker, reduce_signal
from gearshift.train.dynamics import PhaseDriver

__all__ = ["SIGNS_FILE", "PhaseLossMixin", "PhaseSchedulerTrainerCallback"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
#: Gradient signs (int8, safetensors) written next to each checkpoint's ``trainer_state.json``.
SIGNS_FILE = "gearshift_grad_signs.safetensors"


class PhaseSchedulerTrainerCallback(TrainerCallback, ExportableState):
    """Runs the gearshift phase controller inside a Hugging Face ``Trainer``.

    Per optimizer step: ``on_pre_optimizer_step`` measures the gradient-sign stability (after
    clipping, before the update) with a :class:`~gearshift.signals.GradientSignTracker` over the
    model's trainable parameters, averaged over ranks; the step's loss comes from
    :class:`PhaseLossMixin` or the logs (see the module docstring); then ``PhaseScheduler.update``
    is called with ``state.global_step``. A step the optimizer skipped (fp16 overflow) is not
    fed. On a transition — and when training starts or resumes — the phase's alphas are put into
    the LoRA layers of ``model`` (default: the model the ``Trainer`` trains), and a phase
    ``lr_scale`` multiplies the LR of a ``LambdaLR`` / gearshift scheduler (the ``Trainer``'s own
    schedulers are ``LambdaLR``\\ s; its logged ``learning_rate`` stays the unscaled one).

    Checkpoints: the callback is an ``ExportableState``, so the controller's state (JSON) is in
    each checkpoint's ``trainer_state.json`` under ``stateful_callbacks``; the gradient signs go
    to :data:`SIGNS_FILE` in the checkpoint folder. On ``train(resume_from_checkpoint=...)`` the
    callback restores itself when training begins — with transformers' default
    ``restore_callback_states_from_checkpoint=False`` too. With that flag ``True``, transformers
    instead replaces the callback by a new instance built from the saved arguments (so a
    reference kept to the old one goes stale, and ``model=`` falls back to the trained model);
    that needs the phases given as a config, not as a ``PhaseScheduler`` object. The signs are
    looked for in ``<output_dir>/checkpoint-<step>``; if a checkpoint was moved elsewhere they are
    not found and the stability restarts (one step without a value), with a warning.

    Args:
        phases_config_or_scheduler: A ``phases:`` section (either schema) or a ready
            :class:`~gearshift.phases.PhaseScheduler`; ``None`` / ``enabled: false`` disables
            the callback.
        rank: LoRA rank for ``PhaseScheduler.get_scale`` when built from a config.
        model: The model holding the LoRA layers, if not the one the ``Trainer`` trains.
        track_stability: Measure gradient-sign stability (1 byte per trainable element).

    Attributes:
        controller: The :class:`~gearshift.phases.PhaseScheduler` (or ``None``).
        tracker: The :class:`~gearshift.signals.GradientSignTracker` (or ``None``).
        alphas: ``{group: alpha}`` in force.
        last_loss: The loss given at the latest step (``None`` when the step had none).
        last_stability: The stability given at the latest step.
    """

    def __init__(self, phases_config_or_scheduler: Any, *, rank: int | None = None,
                 model: nn.Module | None = None, track_stability: bool = True) -> None:
        self.controller: PhaseScheduler | None = build_controller(phases_config_or_scheduler, rank)
        self.rank = rank
        self.model = model
        self.track_stability = track_stability
        self.tracker: GradientSignTracker | None = None
        self.driver = PhaseDriver(
            self.controller, set_alphas=lambda ctl: lora_alphas(self._target, ctl),
            set_lr_scale=lambda scale: self._lr_scale.apply(self._optimizer, self._scheduler,
                                                            scale),
            say=lambda line: logger.info("gearshift: %s", line))
        self.last_loss: float | None = None
        self.last_stability: float | None = None
        self._config = config_json(phases_config_or_scheduler)
        self._lr_scale = PhaseLRScale(self.controller)
        self._restore: dict[str, Any] | None = None
        self._target: nn.Module | None = None
        self._optimizer: Any = None
        self._scheduler: Any = None
        self._pending_step: int | None = None  # stepped, loss not seen yet (waits for on_log)
        self._stability: tuple[int, float | None] | None = None
        self._micro_sum: Tensor | None = None
        self._mixin = False
        self._warned_logging = False

    # ------------------------------------------------------------------ ExportableState

    @property
    def gearshift_state(self) -> dict[str, Any]:
        """The JSON-safe state: controller and tracker counters (the signs are a file)."""
        return {
            "version": _STATE_VERSION,
            "phases": self.controller.state_dict() if self.controller is not None else None,
            "grad_signs": self.tracker.json_state() if self.tracker is not None else None,
        }

    @gearshift_state.setter
    def gearshift_state(self, value: dict[str, Any]) -> None:
        # transformers' restore_callback_states_from_checkpoint path sets the saved attributes
        # on a freshly built instance; the model is only known when training begins.
        self._restore = value

    def state(self) -> dict[str, Any]:
        """``{"args", "attributes"}`` for ``trainer_state.json`` (JSON-safe).

        A step whose logged loss is still awaited is settled first (with no loss), exactly as
        the next step would settle it, so a checkpoint never holds a half-fed step.
        """
        self._flush()
        return {
            "args": {"phases_config_or_scheduler": self._config, "rank": self.rank,
                     "track_stability": self.track_stability},
            "attributes": {"gearshift_state": self.gearshift_state},
        }

    # ------------------------------------------------------------------ the loss

    def add_micro_loss(self, loss: Tensor) -> None:
        """Record one micro-batch's loss as ``Trainer.training_step`` returns it (the mixin)."""
        self._mixin = True
        loss = loss.detach().float()
        self._micro_sum = loss if self._micro_sum is None else self._micro_sum + loss

    def _flush(self) -> None:
        if self._pending_step is not None:
            step, self._pending_step = self._pending_step, None
            self._feed(step, None)

    def _feed(self, step: int, loss: float | None) -> None:
        assert self.controller is not None
        stability = self._stability[1] if self._stability and self._stability[0] == step else None
        self.last_loss, self.last_stability = loss, stability
        self.driver.update(step, loss, stability)

    @property
    def alphas(self) -> dict[str, float]:
        """``{group: alpha}`` in force."""
        return self.driver.alphas

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        saved, self._restore = self._restore, None
        if self.controller is None:
            if saved and saved.get("phases") is not None:
                raise ConfigError([Problem("phases", (
                    "transformers rebuilt PhaseSchedulerTrainerCallback from trainer_state.json "
                    "(restore_callback_states_from_checkpoint=True), but it had been created from "
                    "a PhaseScheduler object, which cannot be saved there. Pass the phases config "
                    "(a dict) instead, or leave restore_callback_states_from_checkpoint=False"))])
            return
        model = self.model if self.model is not None else model
        self._optimizer, self._scheduler = optimizer, lr_scheduler
        self._target = lora_target(model) if model is not None else None
        self._pending_step, self._stability = None, None
        self._micro_sum = None
        if self.track_stability and self.tracker is None and model is not None:
            self.tracker = GradientSignTracker(
                [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        name = type(self).__name__
        if state.global_step > 0:  # resuming: trainer_state.json came from the checkpoint
            if saved is None:
                entry = state.stateful_callbacks.get(name)
                entry = entry[0] if isinstance(entry, list) else entry
                saved = (entry or {}).get("attributes", {}).get("gearshift_state")
            self._load(saved, args, state)
        # transformers updates stateful_callbacks[name] at each save and fails on a name the
        # resumed checkpoint did not have.
        state.stateful_callbacks.setdefault(name, self.state())
        self.driver.apply()

    def _load(self, saved: dict[str, Any] | None, args: TrainingArguments,
              state: TrainerState) -> None:
        assert self.controller is not None
        if saved is None or saved.get("phases") is None:
            warnings.warn(
                "the checkpoint holds no phase-controller state (written before phases were "
                f"enabled): starting at phase 0 ({self.controller.current_phase.name})",
                stacklevel=3)
            return
        if saved.get("version") != _STATE_VERSION:
            raise CheckpointError(
                f"the checkpoint's PhaseSchedulerTrainerCallback state has version "
                f"{saved.get('version')!r}; this gearshift reads version {_STATE_VERSION}")
        self.controller.load_state_dict(saved["phases"])
        signs = saved.get("grad_signs")
        if self.tracker is None or not signs:
            return
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", SIGNS_FILE)
        if signs.get("has_signs") and not os.path.isfile(path):
            warnings.warn(f"gradient signs not found at {path}: the gradient stability restarts "
                          "(the next step has no value)", stacklevel=3)
            return
        from safetensors.torch import load_file

        self.tracker.load_state(signs, load_file(path) if signs.get("has_signs") else {})

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        if self.controller is None:
            return
        self._flush()  # the previous step logged no loss
        # The scheduler set the LR from its closed form after the last step: rescale it.
        self._lr_scale.apply(self._optimizer, self._scheduler, self.controller.current_lr_scale)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                              control: TrainerControl, **kwargs: Any) -> None:
        if self.controller is not None and self.tracker is not None:
            self._stability = (state.global_step + 1, reduce_signal(self.tracker.update()))

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, optimizer: Any = None, **kwargs: Any) -> None:
        if self.controller is None:
            return
        total, self._micro_sum = self._micro_sum, None
        if getattr(optimizer, "step_was_skipped", False):
            return  # fp16 overflow: the weights did not change, the step does not count
        step = state.global_step
        if total is not None:
            self._feed(step, reduce_signal(float(total)))
            return
        self._pending_step = step
        every_step = args.logging_strategy == "steps" and state.logging_steps == 1
        if not self._mixin and not every_step and not self._warned_logging:
            self._warned_logging = True
            warnings.warn(
                "PhaseSchedulerTrainerCallback takes the loss from the Trainer's logs, which come "
                f"every {state.logging_steps} steps here: the phase controller sees one mean loss "
                "per logging interval. Set logging_steps=1, or train with "
                "class MyTrainer(PhaseLossMixin, Trainer) to feed it every step's loss.",
                stacklevel=2)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.controller is None or self._pending_step is None or not logs or "loss" not in logs:
            return
        step, self._pending_step = self._pending_step, None
        self._feed(step, float(logs["loss"]))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if self.controller is None or self.tracker is None or not state.is_world_process_zero:
            return
        tensors = self.tracker.tensor_state()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not tensors or not os.path.isdir(folder):
            return
        from safetensors.torch import save_file

        tmp = os.path.join(folder, SIGNS_FILE + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(folder, SIGNS_FILE))

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        if self.controller is not None:
            self._flush()


class PhaseLossMixin:
    """Mix into a ``Trainer`` to give :class:`PhaseSchedulerTrainerCallback` every step's loss.

    ``class MyTrainer(PhaseLossMixin, Trainer)`` (the mixin first): each micro-batch's loss, as
    ``training_step`` returns it (already divided for gradient accumulation), goes to every
    :class:`PhaseSchedulerTrainerCallback` of the trainer; their sum over the step, averaged over
    ranks, is the loss the controller gets — whatever ``logging_steps`` is.
    """

    callback_handler: Any

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, PhaseSchedulerTrainerCallback):
                callback.add_micro_loss(loss)
        return loss
