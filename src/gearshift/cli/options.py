"""Arguments shared by several verbs: CONFIG with its flags and ``--set`` (``train``,
``config show|validate``), and the ACTION of verbs that have several (``checkpoint verify``).

Precedence: defaults < CONFIG < flags < ``--set``. Only flags the user gives are applied, so the
config file's values stand otherwise.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

from gearshift.config import Resolved, build_layers, resolve
from gearshift.schedules import ALIASES, SCHEDULES


class Knob(NamedTuple):
    """An everyday flag: the config key it sets, how its value is read and shown."""

    key: str
    type: type
    metavar: str | None  # None: argparse shows the choices
    help: str
    choices: tuple[str, ...] | None = None


def _schedule_help() -> str:
    aliases = ", ".join(f"{alias} = {target}" for alias, target in ALIASES.items())
    return f"LR schedule: {', '.join(SCHEDULES)} (aliases, any case: {aliases})"


KNOBS: dict[str, Knob] = {
    "--learning-rate": Knob("optim.learning_rate", float, "LR", "peak learning rate"),
    "--max-steps": Knob("training.max_steps", int, "N", "optimizer steps (wins over --epochs)"),
    "--epochs": Knob("training.epochs", int, "N", "passes over the training data"),
    "--batch-size": Knob("training.batch_size", int, "N", "samples per micro-batch"),
    "--accumulate-grad-batches": Knob("training.accumulate_grad_batches", int, "N",
                                      "micro-batches per optimizer step"),
    "--scheduler": Knob("schedule.name", str, "NAME", _schedule_help()),
    "--warmup-steps": Knob("schedule.warmup_steps", int, "N", "warmup in optimizer steps"),
    "--warmup-ratio": Knob("schedule.warmup_ratio", float, "RATIO",
                           "warmup as a fraction of the run"),
    "--warmup-epochs": Knob("schedule.warmup_epochs", int, "N", "warmup in epochs"),
    "--lr-min-ratio": Knob("schedule.min_lr_ratio", float, "RATIO",
                           "LR floor as a fraction of the peak"),
    "--grad-clip": Knob("training.grad_clip", float, "MAX",
                        "gradient clipping threshold (0 = off)"),
    "--grad-clip-algorithm": Knob("training.grad_clip_algorithm", str, None, "norm or value",
                                  ("norm", "value")),
    "--precision": Knob("training.precision", str, None, "fp32, bf16 or fp16",
                        ("fp32", "bf16", "fp16")),
    "--seed": Knob("seed", int, "N", "random seed"),
    "--output-dir": Knob("output_dir", str, "DIR", "parent directory of run directories"),
    "--checkpoint-every": Knob("checkpoint.every", int, "N",
                               "checkpoint every N optimizer steps"),
    "--keep-checkpoints": Knob("checkpoint.keep_last", int, "N", "how many checkpoints to keep"),
}

Subparsers = argparse._SubParsersAction  # what ``add_subparsers`` returns


def add_action_verb(sub: Subparsers[argparse.ArgumentParser], name: str, *, help: str,
                    description: str) -> tuple[argparse.ArgumentParser,
                                               Subparsers[argparse.ArgumentParser]]:
    """Add verb ``name`` whose first argument is a required ACTION (stored as ``<name>_command``).

    Returns:
        The verb's parser and the sub-parsers to add its actions to.
    """
    p = sub.add_parser(name, help=help, description=description)
    return p, p.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)


# Flags are stored under "flag:<name>" so they never collide with a verb's own arguments.
_PREFIX = "flag:"


def add_config_args(p: argparse.ArgumentParser, *, flags: bool = True) -> None:
    """Add CONFIG, ``--set`` and (with ``flags``) the everyday knobs to ``p``."""
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="YAML config file (default: the embedded default)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any config key (repeatable)")
    if not flags:
        return
    group = p.add_argument_group("everyday knobs")
    for flag, knob in KNOBS.items():
        group.add_argument(flag, type=knob.type, default=argparse.SUPPRESS, choices=knob.choices,
                           metavar=knob.metavar, help=f"{knob.help} [{knob.key}]",
                           dest=_PREFIX + flag)
    group.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                       default=argparse.SUPPRESS, dest=_PREFIX + "--gradient-checkpointing",
                       help="recompute activations in backward to save memory (watch "
                            "memory/peak_mb in metrics.jsonl; bench/memory.py measures it) "
                            "[training.gradient_checkpointing]")
    group.add_argument("--disable-checkpointing", action="store_true", default=argparse.SUPPRESS,
                       dest=_PREFIX + "--disable-checkpointing",
                       help="write no checkpoints [checkpoint.enabled=false]")
    group.add_argument("--async-checkpoints", action=argparse.BooleanOptionalAction,
                       default=argparse.SUPPRESS, dest=_PREFIX + "--async-checkpoints",
                       help="write checkpoints in a background thread; training waits only for "
                            "the copy to host memory [checkpoint.async]")
    group.add_argument("--resume", default=argparse.SUPPRESS, metavar="{RUN_DIR,auto}",
                       dest=_PREFIX + "--resume",
                       help="continue RUN_DIR, or 'auto' for the newest run of this name [resume]")


def flag_values(args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """``{config key: (flag as given, value)}`` for every flag the user gave."""
    out: dict[str, tuple[str, Any]] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(_PREFIX):
            continue
        flag = dest[len(_PREFIX):]
        if flag == "--gradient-checkpointing":
            out["training.gradient_checkpointing"] = (
                flag if value else "--no-gradient-checkpointing", value)
        elif flag == "--disable-checkpointing":
            out["checkpoint.enabled"] = (flag, False)
        elif flag == "--async-checkpoints":
            out["checkpoint.async"] = (flag if value else "--no-async-checkpoints", value)
        elif flag == "--resume":
            out["resume"] = (flag, value)
        else:
            out[KNOBS[flag].key] = (flag, value)
    return out


def resolve_args(args: argparse.Namespace) -> Resolved:
    """The validated config from CONFIG, the flags and ``--set``, with its audit.

    Raises:
        ConfigError: Listing every problem at once.
    """
    return resolve(build_layers(args.config, args.sets or None, flag_values(args)))
