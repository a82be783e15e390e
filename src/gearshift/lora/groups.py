"""Finding the LoRA layers of a model and sorting them into named groups.

Groups name sets of LoRA layers for the phase controller's alphas and for logging. By default
layers are grouped by type: ``"conv"`` (Conv1d/2d/3d), ``"embedding"`` and ``"linear"`` (every
other LoRA layer). A mapping ``{group: regex}`` groups by module name instead: each layer joins
the first group (in mapping order) whose regex is found (``re.search``) in its module name, and a
layer that matches none joins its type group.

Module names are relative to the *base* model (``model.layers.0.self_attn.q_proj``), without
PEFT's ``base_model.model.`` prefix, so they are the names a user sees in the original model and
the names PEFT matches when it loads an adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from peft.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, LoraLayer
from torch import nn

from gearshift.errors import ConfigError, Problem

__all__ = ["GroupSpec", "TYPE_GROUPS", "base_model_of", "lora_groups", "lora_layers", "type_group"]

#: The groups used when no regex groups are configured.
TYPE_GROUPS: tuple[str, ...] = ("linear", "conv", "embedding")

#: ``None`` (group by type) or ``{group_name: module-name regex}``.
GroupSpec = Mapping[str, str] | None

_GROUPS_ATTR = "_gearshift_lora_groups"
_CONV_TYPES = (Conv1d, Conv2d, Conv3d)


def base_model_of(model: nn.Module) -> nn.Module:
    """The user's model inside PEFT's wrappers (and inside a DDP-style ``.module`` wrapper)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    while True:
        if isinstance(model, PeftModel):
            model = model.base_model
        elif isinstance(model, BaseTuner):
            return model.model
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def type_group(layer: nn.Module) -> str:
    """The type group of one LoRA layer: ``"conv"``, ``"embedding"`` or ``"linear"``."""
    if isinstance(layer, _CONV_TYPES):
        return "conv"
    if isinstance(layer, Embedding):
        return "embedding"
    return "linear"


def compile_groups(groups: GroupSpec, path: str = "lora.groups") -> dict[str, re.Pattern[str]]:
    """Validate a group spec and compile its regexes, reporting every problem at once.

    Raises:
        ConfigError: a group spec that is not a mapping of names to valid regexes.
    """
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise ConfigError(
            [Problem(path, f"must be a mapping {{group: module-name regex}}, got {groups!r}")]
        )
    problems: list[Problem] = []
    compiled: dict[str, re.Pattern[str]] = {}
    for name, pattern in groups.items():
        if not isinstance(name, str) or not name:
            problems.append(Problem(path, f"group names must be non-empty strings, got {name!r}"))
            continue
        if not isinstance(pattern, str):
            problems.append(Problem(f"{path}.{name}", f"must be a regex string, got {pattern!r}"))
            continue
        try:
            compiled[name] = re.compile(pattern)
        except re.error as exc:
            problems.append(Problem(f"{path}.{name}", f"invalid regex {pattern!r}: {exc}"))
    if problems:
        raise ConfigError(problems)
    return compiled


def stored_groups(model: nn.Module) -> GroupSpec:
    """The group spec :func:`~gearshift.lora.attach_lora` recorded on ``model`` (or ``None``)."""
    for candidate in (model, base_model_of(model)):
        spec = candidate.__dict__.get(_GROUPS_ATTR)
        if spec is not None:
            return spec
    return None


def store_groups(model: nn.Module, groups: GroupSpec) -> None:
    """Record ``groups`` on the base model, where every PEFT wrapper of it can find it."""
    base_model_of(model).__dict__[_GROUPS_ATTR] = None if groups is None else dict(groups)


def _group_of(name: str, layer: nn.Module, compiled: Mapping[str, re.Pattern[str]]) -> str:
    for group, pattern in compiled.items():
        if pattern.search(name):
            return group
    return type_group(layer)


def lora_layers(
    model: nn.Module, groups: GroupSpec | str = "stored"
) -> Iterator[tuple[str, LoraLayer, bool, str]]:
    """Yield ``(module_name, layer, is_conv, group)`` for every LoRA layer of ``model``.

    Args:
        model: A PEFT model (or a model with LoRA layers injected).
        groups: A group spec, ``None`` for type groups, or ``"stored"`` (the default) for the
            spec given to :func:`~gearshift.lora.attach_lora`.
    """
    spec = stored_groups(model) if groups == "stored" else groups
    compiled = compile_groups(spec)  # type: ignore[arg-type]
    for name, module in base_model_of(model).named_modules():
        if isinstance(module, LoraLayer) and module.r:
            is_conv = isinstance(module, _CONV_TYPES)
            yield name, module, is_conv, _group_of(name, module, compiled)


def lora_groups(model: nn.Module, groups: GroupSpec | str = "stored") -> dict[str, list[str]]:
    """Map each group to the module names of its LoRA layers (groups without layers omitted).

    Example:
        >>> from torch import nn
        >>> from gearshift.lora import attach_lora
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> peft_model = attach_lora(net, r=2, alpha=4, target_modules=["0", "2"])
        >>> lora_groups(peft_model)
        {'linear': ['0', '2']}
    """
    out: dict[str, list[str]] = {}
    for name, _layer, _is_conv, group in lora_layers(model, groups):
        out.setdefault(group, []).append(name)
    return out


def describe(model: nn.Module, limit: int = 12) -> str:
    """Name the modules LoRA could target, for error messages.

    Gives the distinct short names of the model's Linear / Conv / Embedding modules (what
    ``target_modules`` usually lists) and one full name as an example.
    """
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, Conv1D)
    full = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    if not full:
        full = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in full))
    shown = ", ".join(short[:limit]) + (f", … ({len(short) - limit} more)" if len(short) > limit else "")
    dotted = next((n for n in full if "." in n), None)
    example = f" (full names look like {dotted!r})" if dotted else ""
    return (shown or "none") + example
