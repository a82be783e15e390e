"""The model-transform interface, and a declared-order chain of transforms.

A transform changes the model before training (LoRA adapters now; ternary quantization next)
and knows how the result is checkpointed and exported. The loop only talks to a
:class:`TransformChain`, so no ``if lora`` appears in it.
"""

from __future__ import annotations

import copy
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_model
from torch import nn

from gearshift.phases import PhaseScheduler, build_phase_scheduler


class Transform(ABC):
    """One change to a model, with its checkpoint and export rules.

    Subclasses set :attr:`name` and implement :meth:`apply`; the defaults checkpoint every
    tensor strictly and export the plain model.
    """

    name: ClassVar[str] = ""
    #: Whether a checkpoint must hold every tensor of the model (False: a subset, e.g. adapters).
    strict: ClassVar[bool] = True
    #: A wrapper adds modules that are trained and checkpointed but never exported (e.g. a
    #: value head): the export is the model below it, as :meth:`merge` unwraps it.
    wrapper: ClassVar[bool] = False

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Change ``model`` for training; returns the model to train (maybe a new wrapper)."""

    def checkpoint_tensors(self, model: nn.Module, names: set[str]) -> set[str]:
        """Of the parameter ``names`` the checkpoint would hold, those it must hold."""
        return names

    def set_alphas(self, model: nn.Module, controller: Any) -> dict[str, float] | None:
        """Put the phase controller's alphas in force; None when this transform has none."""
        return None

    def phase_settings(self, phases: Any) -> tuple[Any, int | None]:
        """The ``phases`` section as this transform completes it, and the rank alphas scale
        with (None: no rank)."""
        return phases, None

    def on_step(self, model: nn.Module, step: int, controller: Any) -> dict[str, float]:
        """Called before each optimizer step (``step`` steps done; also after a resume or a
        rollback) with the phase controller (None: no phases); returns metrics logged with
        that step."""
        return {}

    def eval_metrics(self, model: nn.Module) -> dict[str, float]:
        """Metrics logged with every evaluation."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state saved in every checkpoint (empty: nothing to save)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> list[str]:
        """Restore :meth:`state_dict`; returns notes for the resume log."""
        return []

    def merge(self, model: nn.Module) -> nn.Module:
        """The model with this transform folded in (a plain model of the layer below)."""
        return model

    def export(self, model: nn.Module, directory: Path, *, merged: bool) -> None:
        """Write the trained result into the (new, empty) ``directory``."""
        save_plain(self.merge(model) if merged else model, directory)


def save_plain(model: nn.Module, directory: Path) -> None:
    """A transformers model through ``save_pretrained`` (safetensors), any other module as
    ``model.safetensors``."""
    if hasattr(model, "save_pretrained"):
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one tiny shard does not need a progress bar
        try:
            model.save_pretrained(str(directory), safe_serialization=True)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
    else:
        save_model(model, str(directory / "model.safetensors"))


class TransformChain:
    """Transforms applied in their declared order (the first one sees the raw model).

    Checkpoints hold what every transform asks to keep, loaded strictly only when all of them
    are strict. ``export(merged=True)`` folds the transforms back in reverse order into a full
    model directory; ``merged=False`` lets the last transform write its own format (e.g. a
    PEFT adapter).

    Args:
        transforms: In the order they are applied.

    Example:
        >>> chain = TransformChain([])
        >>> chain.strict, chain.names
        (True, [])
    """

    def __init__(self, transforms: Iterable[Transform] = ()) -> None:
        self.transforms: list[Transform] = list(transforms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.transforms]

    @property
    def strict(self) -> bool:
        return all(t.strict for t in self.transforms)

    def apply(self, model: nn.Module) -> nn.Module:
        for transform in self.transforms:
            model = transform.apply(model)
        return model

    def checkpoint_weights(self, model: nn.Module) -> nn.Module | dict[str, torch.Tensor]:
        """What a checkpoint stores of ``model``: the module itself, or the tensors kept."""
        if self.strict:
            return model  # every tensor (tied weights stored once)
        named = dict(model.named_parameters())
        keep = set(named)
        for transform in self.transforms:
            keep = transform.checkpoint_tensors(model, keep)
        return {n: p for n, p in named.items() if n in keep}

    def phase_controller(self, phases: Any) -> PhaseScheduler | None:
        """The phase controller of a ``phases`` section, completed by the transforms (None:
        no section, or ``enabled: false``)."""
        rank = None
        for transform in self.transforms:
            phases, own_rank = transform.phase_settings(phases)
            rank = own_rank if own_rank is not None else rank
        return build_phase_scheduler(phases, rank=rank)

    def set_alphas(self, model: nn.Module, controller: Any) -> dict[str, float] | None:
        """The alphas of the outermost transform that has any (None: none has alphas)."""
        for transform in reversed(self.transforms):
            alphas = transform.set_alphas(model, controller)
            if alphas is not None:
                return alphas
        return None

    def on_step(self, model: nn.Module, step: int, controller: Any) -> dict[str, float]:
        """Every transform's :meth:`Transform.on_step`, merged."""
        out: dict[str, float] = {}
        for transform in self.transforms:
            out.update(transform.on_step(model, step, controller))
        return out

    def eval_metrics(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for transform in self.transforms:
            out.update(transform.eval_metrics(model))
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{transform name: state}`` of the transforms that have state."""
        return {t.name: state for t in self.transforms if (state := t.state_dict())}

    def load_state_dict(self, state: Mapping[str, Any]) -> list[str]:
        notes: list[str] = []
        for transform in self.transforms:
            if transform.name in state:
                notes.extend(transform.load_state_dict(state[transform.name]))
        return notes

    def export(self, model: nn.Module, directory: Path, *, merged: bool = False,
               tokenizer: Any = None) -> Path:
        """Write the trained model to ``directory`` atomically (temp dir, then rename).

        The tokenizer, when given, is saved beside it (and beside a base model saved inside it).
        """
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if merged and self.transforms:
            # Folding changes modules in place: fold a copy, the trained model stays as it is.
            folded = copy.deepcopy(model)
            for transform in reversed(self.transforms):
                folded = transform.merge(folded)
            save_plain(folded, tmp)
        else:
            layers = list(self.transforms)
            while layers and layers[-1].wrapper:
                model = layers.pop().merge(model)
            if layers:
                layers[-1].export(model, tmp, merged=False)
            else:
                save_plain(model, tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            # Beside the export and beside any full model it holds (an adapter's saved base),
            # so that each is a complete model directory.
            for target in [tmp, *(d for d in tmp.iterdir() if (d / "config.json").is_file())]:
                tokenizer.save_pretrained(str(target))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            if old.exists():
                shutil.rmtree(old)
            directory.rename(old)
        tmp.rename(directory)
        if old.exists():
            shutil.rmtree(old)
        return directory

