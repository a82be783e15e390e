"""BitNet b1.58 quantization-aware training as a model transform (``quantization`` section).

Chosen Linear layers become :class:`~gearshift.transforms.ternary.TernaryLinear`: the latent
full-precision weights stay the parameters (same names, so checkpoints and exact resume work as
for any model), and every forward pass uses their ternary quantization with strength λ.

λ rises from 0 to 1 over ``ramp.steps`` optimizer steps (λ = 1 − the multiplier of the
``ramp.shape`` schedule; ``ramp.steps: 0`` is 1 from the first step); with phases on, a phase
that sets ``quant_lambda`` overrides the ramp while it lasts. λ is logged (``quant/lambda``) with
every step and saved in every checkpoint; each evaluation logs the fraction of zero weights per
layer group (``quant/zero_fraction/<group>``, ``quant/zero_fraction`` overall) and the mean
scale ``mean|W|`` (``quant/scale``).

``export`` writes a model directory with packed 2-bit weights that plain
``AutoModelForCausalLM.from_pretrained`` loads (see :mod:`gearshift.transforms.bitnet_export`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from gearshift.config.schema import QuantizationConfig
from gearshift.errors import ConfigError, Problem
from gearshift.schedules import lr_multiplier
from gearshift.transforms.base import Transform
from gearshift.transforms.ternary import VALUES_PER_ITEM, TernaryLinear, ternary_weight

#: Output layers never quantized by default (the issue's "every Linear except lm_head").
DEFAULT_EXCLUDE = ("lm_head",)


def matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether a module name is one of ``patterns``: the name, a dotted suffix, or a regex
    matching the whole name."""
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def select_linears(model: nn.Module, config: QuantizationConfig,
                   ) -> tuple[list[str], list[str]]:
    """``(quantized, unpackable)`` Linear layer names of ``model`` under ``config``.

    Layers whose ``out_features`` is not a multiple of 4 cannot be packed 4 per byte; they stay
    in full precision and are returned as ``unpackable``.
    """
    chosen, unpackable = [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear and not isinstance(module, TernaryLinear):
            continue
        if config.modules is not None:
            if not matches(name, config.modules):
                continue
        elif matches(name, DEFAULT_EXCLUDE):
            continue
        if matches(name, config.exclude):
            continue
        (chosen if module.out_features % VALUES_PER_ITEM == 0 else unpackable).append(name)
    return chosen, unpackable


def ramp_lambda(step: int, steps: int, shape: str = "linear") -> float:
    """λ for the optimizer step after ``step`` steps done: ``1 − multiplier(step + 1)`` of the
    ``shape`` schedule over ``steps`` (no warmup, floor 0); 1 when ``steps`` is 0.

    Example:
        >>> [ramp_lambda(s, 4) for s in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if steps <= 0 or step + 1 >= steps:
        return 1.0
    return 1.0 - lr_multiplier(shape, step + 1, total_steps=steps, min_lr_ratio=0.0)


def ternary_layers(model: nn.Module) -> list[tuple[str, TernaryLinear]]:
    """Every :class:`TernaryLinear` in ``model`` (also under wrappers such as PEFT's)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]


def layer_group(name: str) -> str:
    """The group a layer's statistics are logged under: its own name (``q_proj``, …)."""
    return name.rsplit(".", 1)[-1]


class BitNetTransform(Transform):
    """Ternary quantization-aware training of a model's Linear layers.

    Args:
        config: The ``quantization`` section (``method: bitnet_b158``).
        say: Prints one line for the user (default: stderr).

    Example:
        >>> from gearshift.config.schema import QuantizationConfig
        >>> t = BitNetTransform(QuantizationConfig(method="bitnet_b158"))
        >>> t.name, t.strict
        ('bitnet', True)
    """

    name: ClassVar[str] = "bitnet"

    def __init__(self, config: QuantizationConfig, say: Any = None) -> None:
        self.config = config
        self.say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self.quant_lambda = ramp_lambda(0, config.ramp.steps, config.ramp.shape)
        self.quantized: list[str] = []
        self.unpackable: list[str] = []

    def apply(self, model: nn.Module) -> nn.Module:
        self.quantized, self.unpackable = select_linears(model, self.config)
        if not self.quantized:
            raise ConfigError([Problem(
                "quantization.modules",
                f"no Linear layer of the model is selected for quantization (modules: "
                f"{self.config.modules}, exclude: {self.config.exclude}); name layers that exist, "
                f"e.g. {_some_linears(model)}")])
        bits = self.config.activation_bits
        for name in self.quantized:
            layer = model.get_submodule(name)
            if not isinstance(layer, TernaryLinear):
                model.set_submodule(name, TernaryLinear.from_linear(layer, bits))
        self.set_lambda(model, self.quant_lambda)
        self.say(f"quantization: {len(self.quantized)} Linear layers ternary (BitNet b1.58, "
                 f"{bits}-bit activations)")
        if self.unpackable:
            self.say(f"quantization: {len(self.unpackable)} layers left in full precision "
                     f"(out_features not a multiple of {VALUES_PER_ITEM}, cannot be packed): "
                     + ", ".join(self.unpackable))
        return model

    def set_lambda(self, model: nn.Module, value: float) -> None:
        """Put λ = ``value`` into every ternary layer of ``model``."""
        self.quant_lambda = float(value)
        for _, layer in ternary_layers(model):
            layer.quant_lambda = self.quant_lambda

    def lambda_at(self, step: int, controller: Any = None) -> float:
        """λ of the optimizer step after ``step`` steps: the phase's ``quant_lambda`` when the
        current phase sets one, else the ramp."""
        phase = getattr(controller, "current_phase", None)
        value = getattr(phase, "quant_lambda", None)
        if value is not None:
            return float(value)
        return ramp_lambda(step, self.config.ramp.steps, self.config.ramp.shape)

    def on_step(self, model: nn.Module, step: int, controller: Any) -> dict[str, float]:
        self.set_lambda(model, self.lambda_at(step, controller))
        return {"quant/lambda": self.quant_lambda}

    def eval_metrics(self, model: nn.Module) -> dict[str, float]:
        zeros: dict[str, list[int]] = {}
        scales = []
        for name, layer in ternary_layers(model):
            t, inv = ternary_weight(layer.weight)
            counts = zeros.setdefault(layer_group(name), [0, 0])
            counts[0] += int((t == 0).sum())
            counts[1] += t.numel()
            scales.append(float(1.0 / inv))
        if not scales:
            return {}
        out = {f"quant/zero_fraction/{g}": z / n for g, (z, n) in zeros.items()}
        out["quant/zero_fraction"] = sum(z for z, _ in zeros.values()) / sum(
            n for _, n in zeros.values())
        out["quant/scale"] = sum(scales) / len(scales)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.quant_lambda, "quantized": len(self.quantized)}

    def load_state_dict(self, state: Mapping[str, Any]) -> list[str]:
        if "lambda" in state:
            self.quant_lambda = float(state["lambda"])
        return []

    def merge(self, model: nn.Module) -> nn.Module:
        """The model with plain Linear layers holding the latent weights."""
        for name, layer in ternary_layers(model):
            model.set_submodule(name, layer.to_linear())
        return model

    def export(self, model: nn.Module, directory: Path, *, merged: bool) -> None:
        from gearshift.transforms.bitnet_export import export_packed

        report = export_packed(model, directory, activation_bits=self.config.activation_bits)
        self.say(report.summary())


def _some_linears(model: nn.Module) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, nn.Linear)})
    return ", ".join(names[:8]) or "(the model has no Linear layer)"


def _quantization_problems(raw: Mapping[str, Any]) -> list[Problem]:
    """Cross-section check: phases that set ``quant_lambda`` need a quantization method."""
    phases = raw.get("phases") if isinstance(raw, Mapping) else None
    quant = raw.get("quantization") if isinstance(raw, Mapping) else None
    method = quant.get("method") if isinstance(quant, Mapping) else None
    if not isinstance(phases, Mapping) or method is not None:
        return []
    listed = phases.get("phases")
    if not isinstance(listed, list):
        return []
    return [Problem(f"phases.phases[{i}].quant_lambda",
                    "sets the quantization strength, but quantization.method is null; set "
                    "quantization.method: bitnet_b158 or remove quant_lambda")
            for i, p in enumerate(listed)
            if isinstance(p, Mapping) and p.get("quant_lambda") is not None]


def _register() -> None:
    from gearshift.config.extensions import register_check

    register_check(_quantization_problems)


_register()


__all__ = ["BitNetTransform", "TernaryLinear", "ramp_lambda", "select_linears",
           "ternary_layers"]
