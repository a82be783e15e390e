"""Loading, layering, validating and auditing configurations.

Precedence, lowest to highest: schema defaults < config file (or dict) < CLI flags <
``--set dotted.key=value``. Every non-default value in the resolved config is traced back to the
layer that set it (``overrides.json`` in the run directory).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gearshift.config.extensions import CHECKS, TASK_REGISTRY, load_builtins, task_sections
from gearshift.config.schema import Config
from gearshift.errors import ConfigError, Problem, dedupe_problems, did_you_mean
from gearshift.schedules import schedule_options


@dataclass
class Layer:
    """One source of configuration values: a nested dict and a label saying where it came from."""

    label: str
    values: dict[str, Any]
    # Per dotted key, a more precise label (e.g. which flag); falls back to `label`.
    origins: dict[str, str] = field(default_factory=dict)


def default_config_dict() -> dict[str, Any]:
    """The schema defaults as a plain, JSON-safe dict."""
    return Config().model_dump(mode="json")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a dict, or raise a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        hint = "" if p.suffix else " (did you mean a .yaml file?)"
        raise ConfigError([Problem("", f"config file not found: {p}{hint}")])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("", f"cannot read config file {p}: {exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([Problem("", f"YAML syntax error{where}: {problem}")], str(p)) from None
    except Exception as exc:  # PyYAML's constructors raise plain errors (e.g. 2001-02-30)
        raise ConfigError([Problem("", f"YAML value error: {exc}; quote the value if it is "
                                       "meant as text")], str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem("", f"the top level must be a mapping of sections, got {type(data).__name__}")],
            str(p),
        )
    return data


def parse_set_overrides(items: Iterable[str]) -> Layer:
    """Turn ``["training.max_steps=5", ...]`` into a layer. Values are parsed as YAML scalars."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[Problem] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(
                Problem("--set", f"expected KEY.PATH=VALUE (e.g. training.max_steps=100), got {item!r}")
            )
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except Exception:  # not YAML (or a value PyYAML cannot build): keep the text as is
            value = raw
        _assign(values, key, value)
        origins[key] = f"--set {item}"
    if problems:
        raise ConfigError(problems)
    return Layer("--set", values, origins)


def flags_layer(flags: Mapping[str, tuple[str, Any]]) -> Layer:
    """Build a layer from ``{dotted.key: (flag_name, value)}`` for flags the user actually gave."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, (flag, value) in flags.items():
        _assign(values, key, value)
        origins[key] = f"flag {flag}"
    return Layer("flag", values, origins)


@dataclass
class Resolved:
    """A validated config plus the audit of where every non-default value came from."""

    config: Config
    audit: dict[str, dict[str, Any]]


def resolve(layers: Sequence[Layer]) -> Resolved:
    """Merge layers over the defaults, validate, and audit. Raises ConfigError with every problem."""
    defaults = default_config_dict()
    merged = copy.deepcopy(defaults)
    origin: dict[str, str] = {}
    for layer in layers:
        _clear_replaced_warmup(merged, layer.values)
        _merge(merged, layer.values)
        for key in _leaf_keys(layer.values):
            origin[key] = _origin_for(layer, key)
    config = validate(merged)
    resolved = config.model_dump(mode="json")
    audit: dict[str, dict[str, Any]] = {}
    flat_default = dict(_flatten(defaults))
    for key, value in _flatten(resolved):
        if key in flat_default and flat_default[key] == value:
            continue
        src = origin.get(key) or next(
            (origin[k] for k in origin if key.startswith(k + ".")), "derived"
        )
        audit[key] = {"value": value, "default": flat_default.get(key), "source": src}
    return Resolved(config, audit)


def load_config(
    path_or_dict: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> Config:
    """Load and validate a configuration.

    Args:
        path_or_dict: a YAML file path, a nested dict, or None for the embedded default.
        overrides: dotted keys applied last, either as a mapping
            (``{"training.max_steps": 5}``) or as ``--set`` strings (``["training.max_steps=5"]``).

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: listing every problem found, each with its key path.

    Example:
        >>> cfg = load_config(None, {"training.max_steps": 20})
        >>> cfg.training.max_steps
        20
    """
    return resolve(build_layers(path_or_dict, overrides)).config


def build_layers(
    path_or_dict: str | Path | Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
) -> list[Layer]:
    """The ordered layers for a file/dict, CLI flags and overrides."""
    layers: list[Layer] = []
    if isinstance(path_or_dict, Mapping):
        layers.append(Layer("dict", copy.deepcopy(dict(path_or_dict))))
    elif path_or_dict is not None:
        layers.append(Layer(f"file {path_or_dict}", read_config_file(path_or_dict)))
    if flags:
        layers.append(flags_layer(flags))
    if overrides:
        if isinstance(overrides, Mapping):
            values: dict[str, Any] = {}
            for key, value in overrides.items():
                _assign(values, key, value)
            layers.append(Layer("override", values))
        else:
            layers.append(parse_set_overrides(overrides))
    return layers


def validate(raw: Mapping[str, Any], source: str | None = None) -> Config:
    """Validate a merged dict, reporting schema *and* cross-field problems all at once."""
    load_builtins()
    problems: list[Problem] = []
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc))
    problems.extend(semantic_problems(raw))
    if problems:
        raise ConfigError(dedupe_problems(problems), source)
    assert config is not None  # no problems means pydantic accepted it
    return config


def semantic_problems(raw: Mapping[str, Any]) -> list[Problem]:
    """Cross-field checks, written defensively so they run even when types are wrong elsewhere."""
    out: list[Problem] = []
    sched = _section(raw, "schedule")
    train = _section(raw, "training")
    data = _section(raw, "data")
    build = _section(_section(raw, "model"), "build")

    forms = [k for k in ("warmup_steps", "warmup_ratio", "warmup_epochs") if sched.get(k) is not None]
    if len(forms) > 1:
        out.append(
            Problem(
                "schedule",
                f"two warmup forms at once ({', '.join(forms)}); set only one of "
                "warmup_steps, warmup_ratio, warmup_epochs",
            )
        )
    ratio = sched.get("min_lr_ratio")
    if _is_num(ratio) and not 0.0 <= ratio <= 1.0:
        out.append(Problem("schedule.min_lr_ratio", f"must be within [0, 1], got {ratio}"))
    max_steps, warmup = train.get("max_steps"), sched.get("warmup_steps")
    if _is_int(max_steps) and _is_int(warmup) and warmup >= max_steps:
        out.append(
            Problem(
                "schedule.warmup_steps",
                f"warmup ({warmup}) must be shorter than training.max_steps ({max_steps})",
            )
        )
    epochs, wep = train.get("epochs"), sched.get("warmup_epochs")
    if _is_int(epochs) and _is_int(wep) and max_steps is None and wep >= epochs:
        out.append(
            Problem(
                "schedule.warmup_epochs",
                f"warmup ({wep} epochs) must be shorter than training.epochs ({epochs})",
            )
        )
    name, options = sched.get("name"), sched.get("options")
    if isinstance(name, str) and isinstance(options, dict) and options:
        try:
            allowed = schedule_options(name)
        except ValueError:
            allowed = None  # the unknown name is reported by the schema
        if allowed is not None:
            unknown = False
            for key in options:
                if key not in allowed:
                    unknown = True
                    valid = ", ".join(sorted(allowed)) or "none"
                    out.append(
                        Problem(
                            f"schedule.options.{key}",
                            f"unknown option for schedule {name!r}"
                            f"{did_you_mean(str(key), allowed)}; valid options: {valid}",
                        )
                    )
            if not unknown:
                out.extend(_schedule_option_problems(name, options, train.get("max_steps")))
    lora = _section(raw, "lora")
    groups = lora.get("groups")
    if isinstance(groups, dict):
        for group, pattern in groups.items():
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    out.append(Problem(f"lora.groups.{group}",
                                       f"not a valid regular expression ({exc})"))
    if name in ("plateau", "Adaptive", "adaptive") and "eval_every" in train and \
            train.get("eval_every") is None:
        out.append(Problem("training.eval_every", "the plateau schedule reacts to evaluations; "
                           "set training.eval_every (e.g. 50)"))
    out.extend(_task_problems(raw))
    for check in CHECKS:
        out.extend(check(raw))
    source, paths = data.get("source"), data.get("paths")
    if source in ("text", "jsonl") and not paths:
        out.append(Problem("data.paths", f"data.source is {source!r} but no files are given"))
    if source == "pydoc_topics" and paths:
        out.append(
            Problem("data.paths", "files are given but data.source is 'pydoc_topics'; "
                    "set data.source to 'text' or 'jsonl'")
        )
    hidden, heads, kv = (build.get(k) for k in ("hidden_size", "num_attention_heads",
                                                 "num_key_value_heads"))
    if _is_int(hidden) and _is_int(heads) and heads > 0 and hidden % heads:
        out.append(
            Problem("model.build.num_attention_heads",
                    f"hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})")
        )
    if _is_int(heads) and _is_int(kv) and kv > 0 and heads % kv:
        out.append(
            Problem("model.build.num_key_value_heads",
                    f"num_attention_heads ({heads}) must be divisible by num_key_value_heads ({kv})")
        )
    return out


def _schedule_option_problems(name: str, options: dict[str, Any], max_steps: Any,
                              ) -> list[Problem]:
    """Check option *values* now, as the schedule will when it is built for the run."""
    from gearshift.schedules import build_schedule

    total = max_steps if _is_int(max_steps) and max_steps > 1 else 10**9
    try:
        build_schedule(name, total_steps=total, **{str(k): v for k, v in options.items()})
    except (ValueError, TypeError) as exc:
        problems = getattr(exc, "problems", None)
        if not problems:
            return [Problem("schedule.options", str(exc))]
        return [Problem(f"schedule.options.{p.path}", p.message) for p in problems
                if p.path in options]
    return []


def _task_problems(raw: Mapping[str, Any]) -> list[Problem]:
    """The task name, the sections of registered tasks, and unknown top-level keys."""
    if not isinstance(raw, Mapping):
        return []
    out: list[Problem] = []
    task = raw.get("task", "lm")
    if TASK_REGISTRY and isinstance(task, str) and task not in TASK_REGISTRY:
        out.append(Problem("task", f"unknown task {task!r}{did_you_mean(task, TASK_REGISTRY)}; "
                           f"valid tasks: {', '.join(sorted(TASK_REGISTRY))}"))
    sections = task_sections()
    allowed = [*Config.model_fields, *sections]
    for key, value in raw.items():
        if key in Config.model_fields:
            continue
        if key not in sections:
            out.append(Problem(str(key), f"unknown key{did_you_mean(str(key), allowed)}; valid "
                               f"keys here: {', '.join(sorted(allowed))}"))
            continue
        try:
            sections[key].model_validate({} if value is None else value)
        except ValidationError as exc:
            out.extend(Problem(f"{key}.{p.path}", p.message)
                       for p in _pydantic_problems(exc, sections[key]))
    return out


def config_to_yaml(config: Config) -> str:
    """The fully resolved config as YAML text (what ``config.yaml`` in a run directory holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- helpers


def _pydantic_problems(exc: ValidationError, root: type[BaseModel] = Config) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        path = ".".join(loc)
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(loc[:-1], root)
            msg = f"unknown key{did_you_mean(loc[-1], allowed)}"
            if allowed:
                msg += f"; valid keys here: {', '.join(sorted(allowed))}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "missing"):
                msg += f" (got {err.get('input')!r})"
        problems.append(Problem(path, msg))
    return problems


def _fields_at(loc: Sequence[str], root: type[BaseModel] = Config) -> list[str]:
    model: type[BaseModel] | None = root
    for part in loc:
        fields = {f.alias or name: f for name, f in model.model_fields.items()} if model else {}
        if part not in fields:
            return []
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return [f.alias or name for name, f in model.model_fields.items()] if model else []




def _section(raw: Any, key: str) -> dict[str, Any]:
    value = raw.get(key) if isinstance(raw, Mapping) else None
    return value if isinstance(value, dict) else {}


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


WARMUP_FORMS = ("warmup_steps", "warmup_ratio", "warmup_epochs")


def _clear_replaced_warmup(merged: dict[str, Any], update: Mapping[str, Any]) -> None:
    # A warmup given in a higher layer replaces one given in a lower layer (e.g. --warmup-steps
    # over the default warmup_ratio). Two forms within one layer remain an error.
    sched = update.get("schedule") if isinstance(update, Mapping) else None
    if not isinstance(sched, Mapping) or not isinstance(merged.get("schedule"), dict):
        return
    if any(sched.get(k) is not None for k in WARMUP_FORMS):
        for key in WARMUP_FORMS:
            if key not in sched:
                merged["schedule"][key] = None


def _assign(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _leaf_keys(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key != "options":
            keys.extend(_leaf_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key != "options":
            out.extend(_flatten(value, path + "."))
        else:
            out.append((path, value))
    return out


def _origin_for(layer: Layer, key: str) -> str:
    if key in layer.origins:
        return layer.origins[key]
    for k, v in layer.origins.items():
        if key.startswith(k + "."):
            return v
    return layer.label
