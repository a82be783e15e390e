"""What each ``gearshift`` sub-command does (argument parsing lives in ``main``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gearshift.config import Resolved, build_layers, config_to_yaml, parse_set_overrides, resolve
from gearshift.errors import CheckpointError, UsageError
from gearshift.rundir import RunPaths, list_checkpoints


def dispatch(args: argparse.Namespace, flags: dict[str, tuple[str, object]]) -> int:
    if args.command == "train":
        return cmd_train(_resolve(args, flags))
    if args.command == "resume":
        return cmd_resume(Path(args.run_dir), args.sets)
    if args.command == "config":
        resolved = _resolve(args, flags)
        if args.config_command == "show":
            print(config_to_yaml(resolved.config), end="")
        else:
            print(f"{args.config or 'embedded default'}: valid")
        return 0
    if args.command == "checkpoint":
        if args.checkpoint_command == "inspect":
            return cmd_checkpoint_inspect(Path(args.path), as_json=args.json)
        if args.checkpoint_command == "convert":
            return cmd_checkpoint_convert(Path(args.src), Path(args.dst), force=args.force,
                                          allow_pickle=args.unsafe_allow_pickle)
        return cmd_checkpoint_verify(Path(args.path))
    if args.command == "model":
        from gearshift.cli import model

        return model.run(args)
    raise UsageError(f"unknown command {args.command!r}")


def _resolve(args: argparse.Namespace, flags: dict[str, tuple[str, object]]) -> Resolved:
    return resolve(build_layers(args.config, args.sets or None, flags))


def cmd_train(resolved: Resolved) -> int:
    from gearshift.train import train

    return _report(lambda: train(resolved.config, audit=resolved.audit))


def cmd_resume(run_dir: Path, sets: list[str]) -> int:
    from gearshift.rundir import read_run_config_dict
    from gearshift.train import train

    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory; give the run directory printed by "
                         "`gearshift train` (e.g. runs/default-20260101-120000)")
    layers = build_layers(read_run_config_dict(run_dir), None)
    if sets:
        layers.append(parse_set_overrides(sets))
    resolved = resolve(layers)
    return _report(lambda: train(resolved.config, resume=run_dir, audit=resolved.audit))


def _report(run) -> int:  # type: ignore[no-untyped-def]
    from gearshift.train import TrainingInterrupted

    try:
        result = run()
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    m = result.metrics
    print(f"run directory: {result.run_dir}")
    print(f"steps: {result.step}")
    if "eval/loss" in m:
        before = m.get("eval/loss_before")
        line = f"eval loss: {before:.4f} -> {m['eval/loss']:.4f}" if before is not None else \
            f"eval loss: {m['eval/loss']:.4f}"
        print(line + f" (perplexity {m['eval/ppl']:.2f})")
    if result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    print(f"curves: tensorboard --logdir {RunPaths(result.run_dir).tensorboard}")
    return 0


def cmd_checkpoint_verify(path: Path) -> int:
    from gearshift.checkpoint import verify_checkpoint

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


def cmd_checkpoint_inspect(path: Path, *, as_json: bool = False) -> int:
    """Print what a checkpoint holds (a table, or JSON with ``as_json``); exit code 0."""
    import json

    from gearshift.checkpoint import format_report, inspect_checkpoint

    report = inspect_checkpoint(path)
    print(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    return 0


def cmd_checkpoint_convert(src: Path, dst: Path, *, force: bool = False,
                           allow_pickle: bool = False) -> int:
    """Convert a legacy torch checkpoint to safetensors + JSON and summarize it; exit code 0."""
    from gearshift.checkpoint import convert_checkpoint
    from gearshift.checkpoint.inspection import human_size

    result = convert_checkpoint(src, dst, force=force, allow_pickle=allow_pickle)
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
