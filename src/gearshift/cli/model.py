"""``gearshift model validate DIR``: is a model directory complete enough to load?"""

from __future__ import annotations

import argparse
from pathlib import Path

from gearshift.cli.options import add_action_verb
from gearshift.errors import UsageError

NAME = "model"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift model`` and its actions to the top-level sub-commands."""
    p, actions = add_action_verb(sub, NAME, help="check a model directory",
                                 description="Check a Hugging Face model directory before a "
                                             "run or a pipeline stage loads it.")
    v = actions.add_parser(
        "validate",
        help="exit 0 when DIR has config.json and every weight file; 2 naming everything that "
             "is missing",
        description="Check that DIR holds config.json and its weights (model.safetensors, "
                    "pytorch_model.bin, or a sharded index with every shard it lists). Exit 0 "
                    "when it does; 2 naming all that is missing.")
    v.add_argument("dir", metavar="DIR", help="a model directory, e.g. RUN_DIR/final")
    return p


def run(args: argparse.Namespace) -> int:
    """Validate ``args.dir``; print ``DIR: valid model directory`` and return 0.

    Raises:
        UsageError: If DIR is not a directory.
        ModelError: If something is missing (the CLI prints it and exits 2).
    """
    from gearshift.models import validate_model_dir

    path = Path(args.dir)
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory; give a model directory (config.json and "
                         "weights), e.g. RUN_DIR/final")
    validate_model_dir(path)
    print(f"{path}: valid model directory")
    return 0
