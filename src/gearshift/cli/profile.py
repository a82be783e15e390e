"""``gearshift profile list|show NAME``: the system-prompt profiles and what they render to."""

from __future__ import annotations

import argparse
import datetime

from gearshift.cli.options import add_action_verb
from gearshift.errors import UsageError

NAME = "profile"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift profile list`` and ``gearshift profile show NAME [--date] [--var]``."""
    p, actions = add_action_verb(
        sub, NAME, help="list or show system-prompt profiles",
        description="Profiles give chat runs (task: sft) their system prompt from a template "
                    "with {date}, {weekday}, {model_name} and the profile's own variables.")
    actions.add_parser("list", help="the built-in profiles, each with its template",
                       description="List the built-in profiles: name, description, template.")
    show = actions.add_parser(
        "show", help="a profile's template and the exact system prompt it renders",
        description="Print a profile (a built-in name or a profile YAML file) and the exact "
                    "system prompt a run would use.")
    show.add_argument("name", metavar="NAME", help="a built-in profile or a profile YAML file")
    show.add_argument("--date", metavar="YYYY-MM-DD", default=None,
                      help="the day for {date} and {weekday} (default: today)")
    show.add_argument("--var", dest="variables", action="append", default=[],
                      metavar="KEY=VALUE", help="a value for a placeholder, e.g. "
                      "model_name=tutor (repeatable) [profile.variables]")
    return p


def run(args: argparse.Namespace) -> int:
    """Print the profiles or one profile; 0.

    Raises:
        UsageError: For a malformed ``--date`` or ``--var``.
        ConfigError: For an unknown profile or a placeholder nothing fills.
    """
    from gearshift.data.profiles import BUILTIN_PROFILES, load_profile

    if args.profile_command == "list":
        width = max(map(len, BUILTIN_PROFILES))
        for profile in BUILTIN_PROFILES.values():
            print(f"{profile.name:<{width}}  {profile.description}")
            template = repr(profile.system_prompt) if profile.system_prompt else "(none)"
            print(f"{'':<{width}}  system prompt: {template}")
        print("\nA profile YAML file (name, description, system_prompt, variables) works "
              "wherever a name does: profile.name: path/to/profile.yaml")
        return 0
    day = _date(args.date)
    variables = {}
    for item in args.variables:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--var expects KEY=VALUE (e.g. model_name=tutor), got {item!r}")
        variables[key.strip()] = value
    profile = load_profile(args.name)
    prompt = profile.render(date=day, variables=variables)
    print(f"profile:       {profile.name} ({profile.source})")
    print(f"description:   {profile.description or '-'}")
    print(f"template:      {profile.system_prompt!r}" if profile.system_prompt
          else "template:      (none)")
    if profile.variables:
        print(f"variables:     {profile.variables}")
    print(f"date:          {day.isoformat()}")
    print(f"system prompt: {prompt!r}" if prompt else "system prompt: (none)")
    return 0


def _date(text: str | None) -> datetime.date:
    if text is None:
        return datetime.date.today()
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--date expects YYYY-MM-DD (e.g. 2026-12-03), got {text!r}") from None
