"""``gearshift config show|validate [CONFIG]``: print the resolved config, or check one."""

from __future__ import annotations

import argparse

from gearshift.cli.options import add_action_verb, add_config_args, resolve_args
from gearshift.config import config_to_yaml

NAME = "config"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift config show|validate``, each with CONFIG, ``--set`` and the knobs."""
    p, csub = add_action_verb(sub, NAME, help="show or validate a config",
                              description="Print the fully resolved config, or check one.")
    add_config_args(csub.add_parser("show", help="print the fully resolved config (YAML)"))
    add_config_args(csub.add_parser("validate", help="check a config; exit 2 listing "
                                                     "every problem"))
    return p


def run(args: argparse.Namespace) -> int:
    """Resolve the config (a ConfigError lists every problem); print it or ``valid``; 0."""
    resolved = resolve_args(args)
    if args.config_command == "show":
        print(config_to_yaml(resolved.config), end="")
    else:
        print(f"{args.config or 'embedded default'}: valid")
    return 0
