"""Attaching LoRA to a model through PEFT, with clear errors for bad settings."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from gearshift.errors import ConfigError, Problem
from gearshift.lora.groups import GroupSpec, compile_groups, describe, store_groups

__all__ = ["attach_lora"]

_ALL_LINEAR = "all-linear"
# Layer types PEFT's LoRA wraps out of the box.
_KNOWN_TARGETS = (
    nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D,
)


def _check_settings(
    r: Any, alpha: Any, target_modules: Any, dropout: Any, groups: GroupSpec
) -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(Problem("lora.r", f"must be an integer >= 1, got {r!r}"))
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        problems.append(Problem("lora.alpha", f"must be a number > 0, got {alpha!r}"))
    if isinstance(target_modules, str):
        if not target_modules:
            problems.append(Problem("lora.target_modules", "must not be empty"))
    elif not isinstance(target_modules, Iterable) or isinstance(target_modules, Mapping):
        problems.append(
            Problem(
                "lora.target_modules",
                f"must be a list of module names or one regex string, got {target_modules!r}",
            )
        )
    else:
        names = list(target_modules)
        if not names or not all(isinstance(n, str) and n for n in names):
            problems.append(
                Problem(
                    "lora.target_modules",
                    f"must be a non-empty list of module names, got {names!r}",
                )
            )
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, int | float)
        or not 0.0 <= dropout < 1.0
    ):
        problems.append(Problem("lora.dropout", f"must be in [0, 1), got {dropout!r}"))
    try:
        compile_groups(groups)
    except ConfigError as exc:
        problems.extend(exc.problems)
    return problems


def _check_targets(model: nn.Module, config: LoraConfig, groups: GroupSpec) -> list[Problem]:
    if config.target_modules == _ALL_LINEAR:
        return []  # PEFT expands the shorthand itself
    matched = {n: m for n, m in model.named_modules() if n and check_target_module_exists(config, n)}
    if not matched:
        return [
            Problem(
                "lora.target_modules",
                f"{_shown(config.target_modules)} matched no module of the model (a name matches "
                "a module whose full name is, or ends with '.<name>'; a string is a regex for the "
                f"full name); modules that LoRA can target: {describe(model)}",
            )
        ]
    problems: list[Problem] = []
    containers = [
        f"{n} ({type(m).__name__})"
        for n, m in matched.items()
        if not isinstance(m, _KNOWN_TARGETS) and any(True for _ in m.children())
    ]
    if containers:
        problems.append(
            Problem(
                "lora.target_modules",
                f"{_shown(config.target_modules)} matches modules that hold other layers, which "
                f"LoRA cannot wrap: {', '.join(containers[:5])}; name their Linear / Conv layers "
                "instead",
            )
        )
    for group, pattern in compile_groups(groups).items():
        if not any(pattern.search(n) for n in matched):
            problems.append(
                Problem(
                    f"lora.groups.{group}",
                    f"regex {pattern.pattern!r} matches none of the LoRA targets "
                    f"(e.g. {', '.join(list(matched)[:4])})",
                )
            )
    return problems


def _shown(target_modules: Any) -> str:
    if isinstance(target_modules, str):
        return f"regex {target_modules!r}"
    return repr(sorted(target_modules))


def attach_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    target_modules: str | Iterable[str],
    groups: GroupSpec = None,
    use_rslora: bool = False,
    dropout: float = 0.0,
    adapter_name: str = "default",
    **lora_config_kwargs: Any,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters through PEFT and return the PEFT model.

    PEFT modifies ``model`` in place (its target layers are replaced by LoRA layers and every
    other parameter is frozen). Linear, Conv1d/2d/3d, Embedding, ``transformers`` ``Conv1D`` and
    ``MultiheadAttention`` targets are supported (what PEFT supports).

    Args:
        model: Any ``nn.Module`` (a ``transformers`` model or not).
        r: LoRA rank, >= 1.
        alpha: LoRA alpha; the effective scale is ``alpha / r`` (``alpha / sqrt(r)`` with
            ``use_rslora``). :func:`~gearshift.lora.apply_phase_alpha` changes it during training.
        target_modules: Module names (a name matches itself or any module whose name ends with
            ``.<name>``), one regex matched against whole module names, or ``"all-linear"``.
        groups: ``None`` to group LoRA layers by type (``linear`` / ``conv`` / ``embedding``), or
            ``{group: regex}`` to group them by module name (see :mod:`gearshift.lora.groups`).
        use_rslora: Rank-stabilized LoRA (scale ``alpha / sqrt(r)``).
        dropout: LoRA dropout probability.
        adapter_name: PEFT adapter name.
        **lora_config_kwargs: Passed on to ``peft.LoraConfig`` (``task_type``, ``bias``, …).

    Returns:
        The ``peft.PeftModel``.

    Raises:
        ConfigError: every problem found at once, each named by its key (``lora.r``,
            ``lora.alpha``, ``lora.target_modules``, ``lora.groups.<name>``, ``lora.dropout``);
            target modules matching nothing list modules that do exist.

    Example:
        >>> from torch import nn
        >>> from gearshift.lora import lora_groups
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2))
        >>> peft_model = attach_lora(net, r=2, alpha=8, target_modules=["0", "2"])
        >>> sorted(lora_groups(peft_model))
        ['conv', 'linear']
    """
    problems = _check_settings(r, alpha, target_modules, dropout, groups)
    if problems:
        raise ConfigError(problems)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        lora_dropout=float(dropout),
        **lora_config_kwargs,
    )
    problems = _check_targets(model, config, groups)
    if problems:
        raise ConfigError(problems)
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as exc:
        # PEFT's remaining refusals (e.g. a leaf layer type it cannot wrap) are input errors too.
        raise ConfigError(
            [Problem("lora.target_modules", f"PEFT cannot attach LoRA: {exc}")]
        ) from exc
    store_groups(peft_model, groups)
    return peft_model
