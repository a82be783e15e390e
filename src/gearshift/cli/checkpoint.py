"""``gearshift checkpoint inspect|verify|convert PATH``: look at, check and convert checkpoints."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from gearshift.cli.options import add_action_verb
from gearshift.errors import CheckpointError, UsageError
from gearshift.rundir import RunPaths, list_checkpoints

NAME = "checkpoint"

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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift checkpoint inspect|verify|convert``."""
    top, ksub = add_action_verb(
        sub, NAME, help="inspect, verify or convert checkpoints",
        description="Inspect a checkpoint, check it against its manifest, or convert a legacy "
                    "torch checkpoint to safetensors.")
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
    return top


def run(args: argparse.Namespace) -> int:
    """Run the action given (inspect, verify or convert); its exit code."""
    return ACTIONS[args.checkpoint_command](args)


def verify(args: argparse.Namespace) -> int:
    """Check every checkpoint of PATH against its manifest; 0 when all verify, else 1."""
    from gearshift.checkpoint import verify_checkpoint

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    targets = [path]
    if RunPaths(path).checkpoints.is_dir():
        targets = [entry.path for entry in list_checkpoints(path)]
        if not targets:
            raise CheckpointError(f"{path}/checkpoints holds no step-* checkpoints")
    bad = 0
    for target in targets:
        problems = verify_checkpoint(target)
        if problems:
            bad += 1
            print(f"{target}: CORRUPT")
            for problem in problems:
                print(f"  - {problem}")
        else:
            print(f"{target}: ok")
    return 1 if bad else 0


def inspect(args: argparse.Namespace) -> int:
    """Print what a checkpoint holds (a table, or JSON with ``--json``); exit code 0."""
    import json

    from gearshift.checkpoint import format_report, inspect_checkpoint

    report = inspect_checkpoint(Path(args.path))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def convert(args: argparse.Namespace) -> int:
    """Convert a legacy torch checkpoint to safetensors + JSON and summarize it; exit code 0."""
    from gearshift.checkpoint import convert_checkpoint
    from gearshift.checkpoint.inspection import human_size

    src = Path(args.src)
    result = convert_checkpoint(src, Path(args.dst), force=args.force,
                                allow_pickle=args.unsafe_allow_pickle)
    meta = result.metadata
    print(f"converted {src} ({meta['source']['kind']}) -> {result.destination}")
    print(f"  model.safetensors: {result.tensors} tensors, {result.elements:,} elements, "
          f"{human_size(result.bytes)}")
    for alias, target in result.aliases.items():
        print(f"  alias: {alias} -> {target} (tied; stored once)")
    if meta.get("name_prefix"):
        print(f"  every name starts with {meta['name_prefix']!r} (kept as stored)")
    for item in result.dropped:
        print(f"  dropped: {item['key']} ({item['what']}, {item['tensors']} tensors)")
    kept = sorted(meta.get("metadata") or {})
    print(f"  metadata.json: {', '.join(kept) if kept else 'source files and sha256 only'}")
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": inspect, "verify": verify, "convert": convert,
}
