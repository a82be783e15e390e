"""Profiles: the system prompt of a chat run, from a template with ``{placeholders}``.

A profile is a name, a description and a ``system_prompt`` template. ``{date}`` (YYYY-MM-DD),
``{weekday}`` and ``{model_name}`` are filled by gearshift; any other placeholder is one of the
profile's own ``variables`` (its defaults, overridden by ``profile.variables`` in the config).
Write ``{{`` and ``}}`` for literal braces. Built-in profiles are in :data:`BUILTIN_PROFILES`;
any other name is a path to a YAML file with the same fields::

    name: tutor
    description: a patient arithmetic tutor
    system_prompt: "You are {model_name}, a {style} tutor. Today is {weekday}, {date}."
    variables: {style: patient}

Example:
    >>> load_profile("concise").render(date="2026-12-03")
    'Current date: 2026-12-03. Respond naturally and concisely.'
"""

from __future__ import annotations

import datetime
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gearshift.config.extensions import register_check
from gearshift.errors import ConfigError, Problem, did_you_mean

#: Placeholders gearshift fills itself.
BUILTIN_PLACEHOLDERS = ("date", "weekday", "model_name")
POLICIES = ("replace", "keep", "prepend")
_PROFILE_KEYS = ("name", "description", "system_prompt", "variables")


@dataclass(frozen=True)
class Profile:
    """A named system-prompt template.

    Attributes:
        name: The profile's name (a built-in name, or the ``name`` in its YAML file).
        description: One line for ``gearshift profile list``.
        system_prompt: The template; empty means no system message at all.
        variables: Defaults for the template's own placeholders.
        source: ``built-in`` or the YAML file it came from.
    """

    name: str
    description: str
    system_prompt: str
    variables: dict[str, str] = field(default_factory=dict)
    source: str = "built-in"

    @property
    def placeholders(self) -> list[str]:
        """The placeholder names in the template, in order of first use."""
        return _placeholders(self.system_prompt, self.name)

    def missing(self, variables: Mapping[str, Any] | None = None) -> list[str]:
        """Placeholders neither gearshift, the profile's defaults nor ``variables`` fill."""
        known = {*BUILTIN_PLACEHOLDERS, *self.variables, *(variables or {})}
        return [p for p in self.placeholders if p not in known]

    def render(self, *, date: str | datetime.date | None = None,
               variables: Mapping[str, Any] | None = None) -> str:
        """The system prompt with every placeholder filled.

        Args:
            date: The day for ``{date}`` and ``{weekday}`` (default: today).
            variables: Values for the profile's placeholders (over its defaults) and for
                ``{model_name}`` (default ``model``).

        Raises:
            ConfigError: naming the placeholder nothing fills, and the profile.
        """
        day = _as_date(date)
        values: dict[str, Any] = {"model_name": "model", **self.variables, **(variables or {})}
        values.update(date=day.isoformat(), weekday=day.strftime("%A"))
        missing = self.missing(variables)
        if missing:
            raise ConfigError([Problem("profile.variables", _missing_message(self, missing))])
        return self.system_prompt.format_map(values)


BUILTIN_PROFILES: dict[str, Profile] = {
    "default": Profile("default", "a helpful assistant that knows the date",
                       "You are {model_name}, a helpful assistant. Today is {weekday}, {date}."),
    "concise": Profile("concise", "short answers; the date only",
                       "Current date: {date}. Respond naturally and concisely."),
    "none": Profile("none", "no system prompt", ""),
}


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name, or a profile from a YAML file.

    Raises:
        ConfigError: when the name is neither a built-in nor a readable, well-formed file.

    Example:
        >>> load_profile("none").system_prompt
        ''
    """
    key = str(name_or_path)
    if key in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[key]
    path = Path(key)
    if not path.is_file():
        raise ConfigError([Problem("profile.name", (
            f"unknown profile {key!r}{did_you_mean(key, BUILTIN_PROFILES)}; built-in: "
            f"{', '.join(BUILTIN_PROFILES)}, or give the path of a profile YAML file"))])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError([Problem("profile.name", f"cannot read profile {path}: {first}")]) \
            from None
    problems = _file_problems(path, data)
    if problems:
        raise ConfigError(problems)
    profile = Profile(str(data.get("name") or path.stem), str(data.get("description") or ""),
                      data["system_prompt"],
                      {str(k): str(v) for k, v in (data.get("variables") or {}).items()},
                      source=str(path))
    profile.placeholders  # noqa: B018 -- a template that does not parse fails here
    return profile


def apply_policy(messages: Sequence[Mapping[str, str]], system_prompt: str, policy: str,
                 ) -> list[dict[str, str]]:
    """The conversation with the profile's system prompt in force.

    ``replace`` drops the conversation's own system messages and puts the profile's first;
    ``keep`` keeps a conversation's own system message (the profile's is used only when it
    has none); ``prepend`` puts the profile's first and keeps the conversation's after it. An
    empty system prompt (profile ``none``) leaves the conversation as it is.

    Example:
        >>> apply_policy([{"role": "user", "content": "hi"}], "Be brief.", "replace")[0]
        {'role': 'system', 'content': 'Be brief.'}
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown profile policy {policy!r}; valid: {', '.join(POLICIES)}")
    out = [dict(m) for m in messages]
    if not system_prompt:
        return out
    own = any(m["role"] == "system" for m in out)
    profile_message = {"role": "system", "content": system_prompt}
    if policy == "replace":
        return [profile_message, *(m for m in out if m["role"] != "system")]
    if policy == "keep" and own:
        return out
    return [profile_message, *out]


def _placeholders(template: str, profile: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError([Problem("profile.name", f"profile {profile!r}: the system_prompt is "
                                   f"not a valid template ({exc}); write {{{{ and }}}} for "
                                   "literal braces")]) from None
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ConfigError([Problem("profile.name", (
                f"profile {profile!r}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a plain name; use {{name}} "
                "(and {{ }} for literal braces)"))])
        if name not in names:
            names.append(name)
    return names


def _missing_message(profile: Profile, missing: list[str]) -> str:
    names = ", ".join(f"{{{m}}}" for m in missing)
    sets = ", ".join(f"profile.variables.{m}" for m in missing)
    return (f"profile {profile.name!r} uses placeholder{'s' if len(missing) > 1 else ''} "
            f"{names} that nothing fills; set {sets} (gearshift fills "
            f"{', '.join('{' + p + '}' for p in BUILTIN_PLACEHOLDERS)})")


def _file_problems(path: Path, data: Any) -> list[Problem]:
    where = f"profile file {path}"
    if not isinstance(data, dict):
        return [Problem("profile.name", f"{where}: expected a mapping with system_prompt, got "
                        f"{type(data).__name__}")]
    out = [Problem("profile.name", f"{where}: unknown key {k!r}{did_you_mean(str(k), _PROFILE_KEYS)};"
                   f" valid keys: {', '.join(_PROFILE_KEYS)}") for k in data if k not in _PROFILE_KEYS]
    if not isinstance(data.get("system_prompt"), str):
        out.append(Problem("profile.name", f"{where}: system_prompt must be a string (the "
                           "template), e.g. 'Today is {date}.'"))
    variables = data.get("variables")
    if variables is not None and not (isinstance(variables, dict) and all(
            isinstance(k, str) and isinstance(v, str | int | float) for k, v in variables.items())):
        out.append(Problem("profile.name", f"{where}: variables must map names to strings"))
    return out


def today() -> datetime.date:
    """The date a run starting now fixes as ``profile.date``."""
    return datetime.date.today()


def _as_date(value: str | datetime.date | None) -> datetime.date:
    if value is None:
        return today()
    if isinstance(value, datetime.date):
        return value
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise ConfigError([Problem("profile.date", f"expected a date as YYYY-MM-DD, got "
                                   f"{value!r}")]) from None


@register_check
def _profile_config_problems(raw: Mapping[str, Any]) -> list[Problem]:
    """The profile exists, parses, and nothing in its template is left unfilled."""
    section = raw.get("profile") if isinstance(raw, Mapping) else None
    if section is None:
        section = {}
    if not isinstance(section, Mapping) or not isinstance(section.get("name", "default"), str):
        return []  # the schema reports the wrong type
    variables = section.get("variables") or {}
    try:
        profile = load_profile(section.get("name", "default"))
        missing = profile.missing(variables if isinstance(variables, Mapping) else {})
    except ConfigError as exc:
        return exc.problems
    if missing:
        return [Problem("profile.variables", _missing_message(profile, missing))]
    return []
