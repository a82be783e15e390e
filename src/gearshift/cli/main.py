"""The ``gearshift`` command: one sub-command per verb.

Errors a user can cause (config, data, checkpoint, model, arguments) print one clear message and
exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gearshift.cli import model
from gearshift.errors import GearshiftError

# Flags for the everyday knobs: flag -> (config key, type, help). Only flags the user gives are
# applied, so the config file's values stand otherwise.
FLAGS: dict[str, tuple[str, type | None, str]] = {
    "--learning-rate": ("optim.learning_rate", float, "peak learning rate"),
    "--max-steps": ("training.max_steps", int, "optimizer steps (wins over --epochs)"),
    "--epochs": ("training.epochs", int, "passes over the training data"),
    "--batch-size": ("training.batch_size", int, "samples per micro-batch"),
    "--accumulate-grad-batches": ("training.accumulate_grad_batches", int,
                                  "micro-batches per optimizer step"),
    "--scheduler": ("schedule.name", str, "LR schedule name (see `gearshift config show`)"),
    "--warmup-steps": ("schedule.warmup_steps", int, "warmup in optimizer steps"),
    "--warmup-ratio": ("schedule.warmup_ratio", float, "warmup as a fraction of the run"),
    "--warmup-epochs": ("schedule.warmup_epochs", int, "warmup in epochs"),
    "--lr-min-ratio": ("schedule.min_lr_ratio", float, "LR floor as a fraction of the peak"),
    "--grad-clip": ("training.grad_clip", float, "gradient clipping threshold (0 = off)"),
    "--grad-clip-algorithm": ("training.grad_clip_algorithm", str, "norm or value"),
    "--precision": ("training.precision", str, "fp32, bf16 or fp16"),
    "--seed": ("seed", int, "random seed"),
    "--output-dir": ("output_dir", str, "parent directory of run directories"),
    "--checkpoint-every": ("checkpoint.every", int, "checkpoint every N optimizer steps"),
    "--keep-checkpoints": ("checkpoint.keep_last", int, "how many checkpoints to keep"),
}
CHOICES = {"--grad-clip-algorithm": ["norm", "value"], "--precision": ["fp32", "bf16", "fp16"]}

TRAIN_EPILOG = """\
precedence: defaults < CONFIG < flags < --set (repeatable; values are YAML: 5, 0.1, null, [1,2])
examples:
  gearshift train                                   # the embedded default recipe
  gearshift train my.yaml --max-steps 500 --set data.seq_len=256
  gearshift train my.yaml --resume auto             # continue the newest run of this name
"""


def _add_config_args(p: argparse.ArgumentParser, flags: bool = True) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (default: the embedded default)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any config key (repeatable)")
    if not flags:
        return
    group = p.add_argument_group("everyday knobs")
    for flag, (key, typ, text) in FLAGS.items():
        group.add_argument(flag, type=typ, default=argparse.SUPPRESS, choices=CHOICES.get(flag),
                           help=f"{text} [{key}]", dest=f"flag:{flag}")
    group.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                       default=argparse.SUPPRESS, dest="flag:--gradient-checkpointing",
                       help="recompute activations in backward to save memory "
                            "[training.gradient_checkpointing]")
    group.add_argument("--disable-checkpointing", action="store_true", default=argparse.SUPPRESS,
                       dest="flag:--disable-checkpointing",
                       help="write no checkpoints [checkpoint.enabled=false]")
    group.add_argument("--resume", default=argparse.SUPPRESS, metavar="{RUN_DIR,auto}",
                       dest="flag:--resume",
                       help="continue RUN_DIR, or 'auto' for the newest run of this name [resume]")


def _flag_values(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    out: dict[str, tuple[str, object]] = {}
    for dest, value in vars(args).items():
        if not dest.startswith("flag:"):
            continue
        flag = dest[5:]
        if flag == "--gradient-checkpointing":
            out["training.gradient_checkpointing"] = (
                flag if value else "--no-gradient-checkpointing", value)
        elif flag == "--disable-checkpointing":
            out["checkpoint.enabled"] = (flag, False)
        elif flag == "--resume":
            out["resume"] = (flag, value)
        else:
            out[FLAGS[flag][0]] = (flag, value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gearshift",
        description="Fine-tuning with managed training dynamics: LR schedules that follow the "
                    "clock, LoRA-alpha phases that follow the loss, and runs that survive "
                    "crashes, kills, out-of-memory errors and NaNs (safe checkpoints, exact "
                    "resume).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train from a config (no config: the embedded default)",
                       description="Train a model. With no CONFIG, runs the embedded default: "
                       "a small byte-level Llama trained on the Python reference manual.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)

    p = sub.add_parser("resume", help="continue a run from its newest valid checkpoint",
                       description="Continue RUN_DIR from its newest checkpoint whose manifest "
                       "verifies (corrupt ones are reported and skipped). The run's own "
                       "config.yaml is used; --set changes it (e.g. a longer run).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the run's config (repeatable)")

    p = sub.add_parser("config", help="show or validate a config",
                       description="Print the fully resolved config, or check one.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    _add_config_args(csub.add_parser("show", help="print the fully resolved config (YAML)"))
    _add_config_args(csub.add_parser("validate", help="check a config; exit 2 listing "
                                                      "every problem"))

    _add_checkpoint_parser(sub)
    model.add_parser(sub)
    return parser


CONVERT_EPILOG = """\
SRC is read only with torch.load(weights_only=True): tensors and plain containers, never code.
A file that needs more is refused, naming what it asked for. Tied weights are stored once and
their other names recorded under "aliases" in metadata.json; optimizer state is dropped and
listed under "dropped".
examples:
  gearshift checkpoint convert old/pytorch_model.bin converted/
  gearshift checkpoint convert old/pytorch_model.bin.index.json converted/   # sharded
  gearshift checkpoint convert lightning_logs/version_0/checkpoints/last.ckpt converted/
"""


def _add_checkpoint_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("checkpoint", help="inspect, verify or convert checkpoints",
                       description="Inspect a checkpoint, check it against its manifest, or "
                                   "convert a legacy torch checkpoint to safetensors.")
    ksub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    k = ksub.add_parser("inspect", help="step, phase, schedule and data position, tensors "
                                        "with shapes, dtypes and sizes, manifest status",
                        description="Describe a checkpoint without loading it: step, phase, "
                        "schedule position, data position, every tensor file (names, shapes, "
                        "dtypes and sizes from the safetensors header) and whether the "
                        "manifest verifies. Exit 0 (also for a corrupt checkpoint, which is "
                        "reported as CORRUPT); 2 when PATH is not a checkpoint.")
    k.add_argument("path", metavar="PATH",
                   help="a step-XXXXXXXX folder, a checkpoints/latest link, a run directory "
                        "(its latest checkpoint) or a .safetensors file")
    k.add_argument("--json", action="store_true", help="print the report as JSON")
    k = ksub.add_parser("verify", help="exit 0 when every sha256 matches, else 1 naming each "
                                       "bad or missing file")
    k.add_argument("path", metavar="PATH", help="a step-XXXXXXXX directory or a run directory")
    k = ksub.add_parser("convert", help="convert a legacy torch checkpoint (.pt/.pth/.bin/"
                                        ".ckpt, sharded .bin index) to safetensors + JSON",
                        description="Convert SRC into DST/model.safetensors plus "
                        "DST/metadata.json (non-tensor metadata,\nsource file names and sha256, "
                        "tied-weight aliases, what was dropped).",
                        epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("src", metavar="SRC", help="a .pt/.pth/.bin/.ckpt file, a "
                   "pytorch_model.bin.index.json, or a folder holding one of them")
    k.add_argument("dst", metavar="DST", help="output folder (created; written atomically)")
    k.add_argument("--force", action="store_true",
                   help="replace a model.safetensors / metadata.json already in DST")
    k.add_argument("--unsafe-allow-pickle", action="store_true",
                   help="load files that need arbitrary unpickling with weights_only=False. "
                        "This EXECUTES CODE FROM THE FILE: only for files you made yourself")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from gearshift import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    from gearshift.cli import commands

    try:
        return commands.dispatch(args, _flag_values(args))
    except GearshiftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\naborted (a second Ctrl-C); the newest checkpoint is intact", file=sys.stderr)
        return 130
