"""``gearshift launch [accelerate launch options] -- train CONFIG …``: several processes, one or
several machines, through ``accelerate launch``.

Everything before ``--`` goes to ``accelerate launch`` unchanged (``--num_processes``,
``--num_machines``, ``--machine_rank``, ``--main_process_ip``, ``--main_process_port``,
``--config_file`` …); after ``--`` comes the gearshift verb each process runs (``train`` or
``resume``). The verb's arguments are checked here first, so a bad config is reported once, with
exit code 2, before any process starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from gearshift.errors import UsageError

NAME = "launch"

#: The verbs a launch may run (the ones that train).
LAUNCHABLE = ("train", "resume")
#: Accelerate's launchers that start processes themselves; on a machine without GPUs its
#: ``--multi_gpu`` launcher (torchrun) is the one that starts several CPU processes (gloo).
LAUNCHERS = ("--multi_gpu", "--use_fsdp", "--use_deepspeed", "--use_megatron_lm", "--tpu")

EPILOG = """\
everything before -- is passed to `accelerate launch` (see `accelerate launch --help`); after
-- comes `train CONFIG …` or `resume RUN_DIR …`, run by every process. With more than one process
(or machine) Accelerate's torchrun launcher is chosen (--multi_gpu; on a machine without GPUs
gearshift trains on CPU with gloo). Precision comes from the config (training.precision), the
strategy (ddp / fsdp) from its distributed: section; DeepSpeed through --config_file.
examples:
  gearshift launch --num_processes 4 -- train my.yaml
  # two machines, two processes each (run on each machine, with its own --machine_rank):
  gearshift launch --num_processes 4 --num_machines 2 --machine_rank 0 \\
      --main_process_ip 10.0.0.1 --main_process_port 29500 -- train my.yaml --run-dir runs/exp
  gearshift launch --num_processes 2 -- resume runs/exp   # resume on another cluster size
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift launch [accelerate options] -- VERB …``."""
    p = sub.add_parser("launch", help="run train / resume in several processes or machines "
                       "(accelerate launch)",
                       description="Start `gearshift train` or `gearshift resume` in several "
                       "processes, on one machine or several, through `accelerate launch`.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       # Every argument is passed through: none may be taken for an option here.
                       prefix_chars="+", add_help=False)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="[ACCELERATE OPTIONS] -- VERB ...",
                   help="accelerate launch options, then --, then the gearshift verb to run")
    p.set_defaults(launch_help=p.format_help)
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(accelerate options, gearshift verb and its arguments)`` of ``argv``, split at ``--``.

    Raises:
        UsageError: without ``--``, or when no launchable verb follows it.
    """
    argv = list(argv)
    if "--" not in argv:
        raise UsageError("gearshift launch needs -- before the verb to run, e.g. "
                         "`gearshift launch --num_processes 2 -- train my.yaml`")
    cut = argv.index("--")
    options, verb = argv[:cut], argv[cut + 1:]
    if not verb or verb[0] not in LAUNCHABLE:
        got = f"'{verb[0]}'" if verb else "nothing"
        raise UsageError(f"gearshift launch runs one of {', '.join(LAUNCHABLE)} after --, got "
                         f"{got}; e.g. `gearshift launch --num_processes 2 -- train my.yaml`")
    return options, verb


def accelerate_args(options: list[str]) -> list[str]:
    """The ``accelerate launch`` options, checked by Accelerate's own parser, with gearshift's
    defaults: a launcher that starts the processes, and no mixed precision / dynamo from an
    Accelerate default config (the gearshift config decides).

    Raises:
        UsageError: an option ``accelerate launch`` does not know, or a bad value.
    """
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    try:
        with open(os.devnull, "w") as quiet:  # its usage text would hide our one-line message
            stderr, sys.stderr = sys.stderr, quiet
            try:
                parsed, unknown = parser.parse_known_args([*options, "gearshift"])
            finally:
                sys.stderr = stderr
    except SystemExit:
        raise UsageError(f"accelerate launch does not accept {' '.join(options)!r}; see "
                         "`accelerate launch --help` for its options") from None
    if unknown:
        raise UsageError(f"accelerate launch does not know {' '.join(unknown)}; see "
                         "`accelerate launch --help` for its options")
    if parsed.cpu or getattr(parsed, "use_cpu", False):
        raise UsageError("drop --cpu: it makes accelerate launch start a single process (MPI "
                         "only); without GPUs gearshift trains on CPU with gloo by itself")
    out = list(options)
    several = (parsed.num_processes or 1) > 1 or (parsed.num_machines or 1) > 1
    if several and not any(flag in out for flag in LAUNCHERS):
        out.insert(0, "--multi_gpu")
    if "--num_machines" not in out:
        out += ["--num_machines", "1"]
    if "--mixed_precision" not in out:
        out += ["--mixed_precision", "no"]
    if "--dynamo_backend" not in out:
        out += ["--dynamo_backend", "no"]
    if (parsed.num_machines or 1) > 1 and parsed.main_process_ip is None:
        raise UsageError("--num_machines above 1 needs --main_process_ip (the address of the "
                         "machine with --machine_rank 0) and --main_process_port")
    return out


def check_verb(verb: list[str]) -> None:
    """Parse (and for ``train`` resolve) the verb's arguments here, once, before launching."""
    from gearshift.cli.main import build_parser

    parser = build_parser()
    try:
        with open(os.devnull, "w") as quiet:
            stderr, sys.stderr = sys.stderr, quiet
            try:
                args = parser.parse_args(verb)
            finally:
                sys.stderr = stderr
    except SystemExit:
        raise UsageError(f"`gearshift {' '.join(verb)}` is not a valid command; see "
                         f"`gearshift {verb[0]} --help`") from None
    if args.command == "train":
        from gearshift.cli.options import resolve_args

        resolve_args(args)  # ConfigError: every problem, once, exit 2
    elif not os.path.isdir(args.run_dir):
        raise UsageError(f"{args.run_dir} is not a run directory; give the RUN_DIR that "
                         "`gearshift train` printed")


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then run ``accelerate launch … -m gearshift VERB …``; its exit code."""
    if not args.argv or args.argv[0] in ("-h", "--help"):
        print(args.launch_help())
        return 0 if args.argv else 2
    options, verb = split_argv(args.argv)
    launch = accelerate_args(options)
    check_verb(verb)
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch,
               "-m", "gearshift", *verb]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    return subprocess.call(command, env=env)
