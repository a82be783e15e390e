"""Applying the phase controller's alpha to LoRA layers, and exporting adapters that keep it.

PEFT stores two numbers per LoRA layer and adapter: ``lora_alpha[adapter]`` and
``scaling[adapter]`` (``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilized LoRA); the forward
pass uses only ``scaling``. :func:`apply_phase_alpha` sets both, consistently, and keeps the
adapter's ``LoraConfig`` (``lora_alpha`` + ``alpha_pattern``) in step, so that the adapter saved
by :func:`export_adapter` — or by a plain ``save_pretrained`` — reloads with the alphas that were
in force, not the ones LoRA was attached with.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.utils.other import get_pattern_key
from torch import nn

from gearshift.errors import ModelError
from gearshift.lora.groups import lora_layers

__all__ = ["AlphaSource", "adapter_alphas", "apply_phase_alpha", "export_adapter"]


class AlphaSource(Protocol):
    """What :func:`apply_phase_alpha` needs from a phase controller."""

    def get_alpha(self, module_name: str, is_conv: bool = False, expert: str | None = None) -> float:
        ...

    def get_scale(
        self, module_name: str, rank: int, is_conv: bool = False, expert: str | None = None
    ) -> float:
        ...


def _denominator(layer: LoraLayer, adapter: str) -> float:
    r = layer.r[adapter]
    return math.sqrt(r) if layer.use_rslora.get(adapter, False) else float(r)


def _alpha_in_force(layer: LoraLayer, adapter: str) -> float:
    """The alpha that, under this layer's PEFT convention, gives its current scaling."""
    scale = float(layer.scaling[adapter])
    stored = float(layer.lora_alpha[adapter])
    denominator = _denominator(layer, adapter)
    # Prefer the stored alpha (exact, readable) whenever it still explains the scaling.
    if math.isclose(stored / denominator, scale, rel_tol=1e-12, abs_tol=0.0):
        return stored
    return scale * denominator


def _active_adapter(model: nn.Module) -> str:
    adapter = getattr(model, "active_adapter", "default")
    if isinstance(adapter, list | tuple):
        adapter = adapter[0]
    return str(adapter)


def adapter_alphas(model: nn.Module, adapter_name: str | None = None) -> dict[str, float]:
    """The alpha in force for each LoRA layer (by module name) of one adapter."""
    adapter = adapter_name or _active_adapter(model)
    return {
        name: _alpha_in_force(layer, adapter)
        for name, layer, _is_conv, _group in lora_layers(model, None)
        if adapter in layer.scaling
    }


def _sync_config(model: PeftModel, adapter: str) -> None:
    """Rewrite ``lora_alpha`` / ``alpha_pattern`` so that PEFT would rebuild the current alphas."""
    config = model.peft_config[adapter]
    alphas = adapter_alphas(model, adapter)
    if not alphas:
        return
    counts = Counter(alphas.values())
    top = max(counts.values())
    tied = [a for a, c in counts.items() if c == top]
    default = config.lora_alpha if config.lora_alpha in tied else tied[0]
    others = {n: a for n, a in alphas.items() if a != default}
    # Short keys ("q_proj") where every layer they would match shares one alpha; anchored
    # full names elsewhere. PEFT matches a key as r"(.*\.)?(KEY)$" against module names.
    by_short: dict[str, set[float]] = {}
    for name, value in alphas.items():
        by_short.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    pattern: dict[str, float] = {}
    for name, value in others.items():
        short = name.rsplit(".", 1)[-1]
        if by_short[short] == {value}:
            pattern[re.escape(short)] = value
        else:
            pattern["^" + re.escape(name)] = value
    resolved = {n: pattern.get(get_pattern_key(list(pattern), n), default) for n in alphas}
    if resolved != alphas:  # a module name that a short key would also catch: be explicit
        pattern = {"^" + re.escape(n): a for n, a in others.items()}
    config.lora_alpha = default
    config.alpha_pattern = pattern


_mismatch_warned: set[tuple[bool, int]] = set()


def apply_phase_alpha(
    model: nn.Module,
    phase_scheduler: AlphaSource,
    *,
    expert_of: Callable[[str], str | None] | None = None,
) -> dict[str, float]:
    """Set every LoRA layer's scale from the phase controller; return the alphas now in force.

    For each LoRA layer and each of its active adapters, ``scaling`` becomes
    ``phase_scheduler.get_scale(name, r, is_conv=..., expert=...)`` and ``lora_alpha`` the alpha
    that gives that scale under the layer's own convention (``alpha / r``, or ``alpha / sqrt(r)``
    with ``use_rslora``). If the controller's own alpha disagrees (its rank-stabilized setting
    differs from the adapter's), the controller's scale wins and a warning says so. A PEFT
    model's ``LoraConfig`` is updated to match. Call it after each phase transition and on resume.

    Args:
        model: A PEFT model (or a model holding LoRA layers).
        phase_scheduler: Anything with ``get_alpha(module_name, is_conv=False, expert=None)`` and
            ``get_scale(module_name, rank, is_conv=False, expert=None)`` — a ``PhaseScheduler``.
        expert_of: Maps a module name to its expert (mixture-of-experts models), passed on as
            ``expert=``; ``None`` passes ``expert=None`` and lets the controller decide.

    Returns:
        ``{group: alpha}`` for logging — keyed ``"group/expert"`` for layers that belong to an
        expert. When layers of one key differ (per-module alphas), the first layer's is reported.

    Raises:
        ModelError: a LoRA layer is merged into its base weights (unmerge first).
    """
    in_force: dict[str, float] = {}
    touched: set[str] = set()
    for name, layer, is_conv, group in lora_layers(model):
        if layer.merged:
            raise ModelError(
                f"LoRA layer {name!r} is merged into its base weights, so its scale cannot change; "
                "call unmerge_adapter() before applying phase alphas"
            )
        expert = expert_of(name) if expert_of is not None else None
        alpha = float(phase_scheduler.get_alpha(name, is_conv=is_conv, expert=expert))
        for adapter in layer.active_adapters:
            if adapter not in layer.scaling:
                continue
            rank = layer.r[adapter]
            scale = float(phase_scheduler.get_scale(name, rank, is_conv=is_conv, expert=expert))
            layer.scaling[adapter] = scale
            denominator = _denominator(layer, adapter)
            if math.isclose(alpha / denominator, scale, rel_tol=1e-9, abs_tol=0.0):
                layer.lora_alpha[adapter] = alpha
            else:
                layer.lora_alpha[adapter] = scale * denominator
                _warn_mismatch(name, alpha, scale, rank, layer.use_rslora.get(adapter, False))
            touched.add(adapter)
            key = group if expert is None else f"{group}/{expert}"
            in_force.setdefault(key, _alpha_in_force(layer, adapter))
    if isinstance(model, PeftModel):
        for adapter in sorted(touched):
            _sync_config(model, adapter)
    return in_force


def _warn_mismatch(name: str, alpha: float, scale: float, rank: int, rslora: bool) -> None:
    signature = (rslora, rank)
    if signature in _mismatch_warned:
        return
    _mismatch_warned.add(signature)
    convention = "alpha / sqrt(r)" if rslora else "alpha / r"
    warnings.warn(
        f"the phase controller gives LoRA layer {name!r} (r={rank}) alpha {alpha:g} but scale "
        f"{scale:g}, while this adapter uses {convention}; the scale is applied and the alpha is "
        "stored as the one that gives it. Make the phases' and the LoRA's use_rslora agree.",
        stacklevel=3,
    )


def export_adapter(
    model: PeftModel,
    directory: str | Path,
    *,
    adapter_name: str | None = None,
    is_main_process: bool = True,
) -> Path:
    """Write a PEFT adapter directory that reloads with the alphas in force now.

    The directory holds ``adapter_model.safetensors`` and an ``adapter_config.json`` whose
    ``lora_alpha`` (the most common alpha) and ``alpha_pattern`` (every other layer) reproduce each
    layer's current scale, so ``PeftModel.from_pretrained(base_model, directory)`` computes what
    the trained model computes. With rank-stabilized LoRA the config keeps ``use_rslora: true``
    and the alphas are such that ``alpha / sqrt(r)`` is the scale in force.

    Args:
        model: The trained PEFT model.
        directory: Where to write; PEFT puts an adapter not named ``"default"`` in
            ``directory/<adapter_name>``.
        adapter_name: The adapter to export (default: the active one).
        is_main_process: Only the main process writes files (distributed runs).

    Returns:
        The adapter directory.

    Raises:
        ModelError: ``model`` is not a PEFT model or has no such adapter.
    """
    if not isinstance(model, PeftModel):
        raise ModelError(
            f"export_adapter needs a PEFT model (from attach_lora), got {type(model).__name__}"
        )
    adapter = adapter_name or _active_adapter(model)
    if adapter not in model.peft_config:
        raise ModelError(
            f"the model has no adapter {adapter!r}; it has {sorted(model.peft_config)}"
        )
    _sync_config(model, adapter)
    directory = Path(directory)
    model.save_pretrained(
        str(directory),
        safe_serialization=True,
        selected_adapters=[adapter],
        is_main_process=is_main_process,
    )
    return directory if adapter == "default" else directory / adapter
