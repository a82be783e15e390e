"""Validation of a raw ``phases:`` section: schema detection and *every* problem at once.

Each problem's path starts with ``phases.`` (``phases.phases.1.exit.max_cv``,
``phases.conv_alpha_phases.balance.min_steps``) so that the config layer can merge these problems
with its own; an unknown key comes with a did-you-mean and the keys valid there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from gearshift.errors import ConfigError, Problem, dedupe_problems, did_you_mean
from gearshift.phases.schema import LORA_KEYS, LoraTrainerPhasesConfig, PhasesConfig, SchemaModel

PREFIX = "phases"
TYPE_GROUPS: tuple[str, ...] = ("linear", "conv")


def validate_phases_config(raw: Any) -> list[Problem]:
    """Return every problem of a raw ``phases:`` section (empty list when it is valid).

    Args:
        raw: The mapping found under ``phases:`` (either schema), a model of either schema, or
            ``None``.

    Returns:
        Problems whose paths start with ``phases.``; none for ``None`` or an empty mapping.

    Example:
        >>> [str(p) for p in validate_phases_config({"phases": [{"name": "a", "min_step": 5}]})]
        ["phases.phases.0.min_step: unknown key (did you mean 'min_steps'?); valid keys here: \
alpha, exit, expert_alpha, lr_scale, max_steps, min_steps, name"]
    """
    return _parse(raw)[1]


def parse_phases_config(raw: Any) -> SchemaModel | None:
    """Validate ``raw`` and return the model of its schema (``None`` when ``raw`` is empty).

    Args:
        raw: A mapping of either schema, an already built model of either schema, or ``None``.

    Raises:
        ConfigError: Listing every problem found.
    """
    model, problems = _parse(raw)
    if problems:
        raise ConfigError(problems, source="the phases section")
    return model


def schema_of(raw: Mapping[str, Any]) -> type[SchemaModel]:
    """The schema class a raw section is written in (LoRA-trainer keys win)."""
    return LoraTrainerPhasesConfig if LORA_KEYS & set(raw) else PhasesConfig


def _parse(raw: Any) -> tuple[SchemaModel | None, list[Problem]]:
    if raw is None:
        return None, []
    if isinstance(raw, (PhasesConfig, LoraTrainerPhasesConfig)):
        raw = raw.model_dump(by_alias=True)  # a model built in code gets the cross-field checks
    if not isinstance(raw, Mapping):
        return None, [Problem(PREFIX, f"must be a mapping (the phases section), got "
                                      f"{type(raw).__name__}")]
    if not raw:
        return None, []
    problems: list[Problem] = []
    data = dict(raw)
    cls = schema_of(data)
    if cls is LoraTrainerPhasesConfig and "phases" in data:
        data.pop("phases")
        problems.append(Problem(
            f"{PREFIX}.phases", "the gearshift schema's 'phases' list cannot be mixed with the "
            f"LoRA-trainer schema ({', '.join(sorted(LORA_KEYS & set(raw)))}); use one of them"))
    model: SchemaModel | None = None
    try:
        model = cls.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, cls))
    if cls is PhasesConfig:
        problems.extend(_own_problems(data))
    else:
        problems.extend(_lora_problems(data))
    return (None if problems else model), dedupe_problems(problems)


# --------------------------------------------------------------------------- semantics


def _own_problems(raw: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    groups = _patterns(raw, "groups", out)
    experts = _patterns(raw, "experts", out)
    for name in groups:
        if name in TYPE_GROUPS:
            out.append(Problem(f"{PREFIX}.groups.patterns.{name}",
                               f"{name!r} is a built-in group (by layer type); choose another name"))
    phases = raw.get("phases")
    if not phases and raw.get("enabled", True) is not False and isinstance(phases, (list, type(None))):
        out.append(Problem(f"{PREFIX}.phases", "no phases given; list at least one, e.g. "
                                               "phases: [{name: foundation, alpha: 8}]"))
    if not isinstance(phases, list):
        return out
    seen: dict[str, int] = {}
    for i, phase in enumerate(phases):
        if not isinstance(phase, Mapping):
            continue
        path = f"{PREFIX}.phases.{i}"
        name = phase.get("name")
        if isinstance(name, str) and name in seen:
            out.append(Problem(f"{path}.name", f"duplicate phase name {name!r} (also phase "
                                               f"{seen[name]}); phase names must be unique"))
        elif isinstance(name, str):
            seen[name] = i
        _steps_problem(phase, path, out)
        out.extend(_alpha_problems(phase.get("alpha"), f"{path}.alpha", groups))
        expert_alpha = phase.get("expert_alpha")
        if isinstance(expert_alpha, Mapping):
            for expert, alpha in expert_alpha.items():
                where = f"{path}.expert_alpha.{expert}"
                if expert not in experts:
                    known = ", ".join(experts) or "none declared"
                    out.append(Problem(where, f"unknown expert{did_you_mean(str(expert), experts)}"
                                              f"; declare it under phases.experts.patterns "
                                              f"(known: {known})"))
                out.extend(_alpha_problems(alpha, where, groups, allow_none=False))
    return out


def _lora_problems(raw: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    phases = raw.get("conv_alpha_phases")
    if not phases and raw.get("enabled", True) is not False and isinstance(phases, (dict, type(None))):
        out.append(Problem(f"{PREFIX}.conv_alpha_phases", "no phases given; map each phase name "
                                                          "to {alpha, min_steps, exit_criteria}"))
    names = list(phases) if isinstance(phases, Mapping) else []
    if isinstance(phases, Mapping):
        for name, phase in phases.items():
            if isinstance(phase, Mapping):
                _steps_problem(phase, f"{PREFIX}.conv_alpha_phases.{name}", out)
    experts = raw.get("per_expert")
    if not isinstance(experts, Mapping):
        return out
    for expert, body in experts.items():
        if not isinstance(body, Mapping):
            continue
        where = f"{PREFIX}.per_expert.{expert}"
        pattern = body.get("pattern")
        if isinstance(pattern, str):
            _compile_problem(pattern, f"{where}.pattern", out)
        expert_phases = body.get("phases")
        if isinstance(expert_phases, Mapping) and names:
            for name in expert_phases:
                if name not in names:
                    out.append(Problem(f"{where}.phases.{name}",
                                       f"unknown phase{did_you_mean(str(name), names)}; phases "
                                       f"in conv_alpha_phases: {', '.join(names)}"))
    return out


def _patterns(raw: Mapping[str, Any], key: str, out: list[Problem]) -> list[str]:
    section = raw.get(key)
    patterns = section.get("patterns") if isinstance(section, Mapping) else None
    if not isinstance(patterns, Mapping):
        return []
    for name, pattern in patterns.items():
        if isinstance(pattern, str):
            _compile_problem(pattern, f"{PREFIX}.{key}.patterns.{name}", out)
    return [str(n) for n in patterns]


def _compile_problem(pattern: str, path: str, out: list[Problem]) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        out.append(Problem(path, f"invalid regular expression {pattern!r}: {exc}"))


def _steps_problem(phase: Mapping[str, Any], path: str, out: list[Problem]) -> None:
    lo, hi = phase.get("min_steps"), phase.get("max_steps")
    if _is_int(lo) and _is_int(hi) and hi < lo:
        out.append(Problem(f"{path}.max_steps",
                           f"max_steps ({hi}) must be >= min_steps ({lo})"))


def _alpha_problems(value: Any, path: str, groups: list[str],
                    allow_none: bool = True) -> list[Problem]:
    if value is None and allow_none:
        return []
    if _is_alpha(value):
        return []
    if not isinstance(value, Mapping) or not value:
        return [Problem(path, f"must be a number >= 0 or a mapping {{group: alpha}}, "
                              f"got {value!r}")]
    out = []
    known = list(dict.fromkeys([*TYPE_GROUPS, *groups]))
    for group, alpha in value.items():
        if group not in known:
            out.append(Problem(f"{path}.{group}",
                               f"unknown group{did_you_mean(str(group), known)}; groups: "
                               f"{', '.join(known)} (declare more under phases.groups.patterns)"))
        if not _is_alpha(alpha):
            out.append(Problem(f"{path}.{group}", f"alpha must be a number >= 0, got {alpha!r}"))
    return out


def _is_alpha(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- pydantic errors


def _pydantic_problems(exc: ValidationError, cls: type[BaseModel]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        path = ".".join((PREFIX, *loc))
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(cls, loc[:-1])
            msg = f"unknown key{did_you_mean(loc[-1], allowed)}"
            if allowed:
                msg += f"; valid keys here: {', '.join(sorted(allowed))}"
        elif err["type"] == "missing":
            msg = f"required key '{loc[-1]}' is missing"
            if loc[-1] == "alpha" and "conv_alpha_phases" in loc:
                msg += " (every phase needs its conv LoRA alpha, e.g. alpha: 8)"
        else:
            msg = err["msg"].removeprefix("Value error, ") + f" (got {err.get('input')!r})"
        problems.append(Problem(path, msg))
    return problems


def _fields_at(cls: type[BaseModel], loc: Iterable[str]) -> list[str]:
    ann: Any = cls
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if part not in ann.model_fields:
                return []
            ann = ann.model_fields[part].annotation
        elif get_origin(ann) in (list, dict):
            ann = get_args(ann)[-1]
        else:
            return []
    ann = _unwrap(ann)
    if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
        return []
    return [f.alias or name for name, f in ann.model_fields.items()]


def _unwrap(ann: Any) -> Any:
    if get_origin(ann) in (Union, UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return args[0] if len(args) == 1 else ann
    return ann
