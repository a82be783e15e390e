"""``gearshift train [CONFIG]``: train from a config (no config: the embedded default)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from gearshift.cli.options import add_config_args, resolve_args
from gearshift.rundir import RunPaths

if TYPE_CHECKING:
    from gearshift.train import RunResult

NAME = "train"

EPILOG = """\
precedence: defaults < CONFIG < flags < --set (repeatable; values are YAML: 5, 0.1, null, [1,2])
at the end it prints the run directory, steps, eval loss, the run's peak memory (CPU: peak RSS
of the process; CUDA: max allocated; per logged step as memory/peak_mb in metrics.jsonl) and
the final model directory (validated by `gearshift model validate`)
model.path may be a model directory or a LoRA adapter directory (the adapter is continued)
examples:
  gearshift train                                   # the embedded default recipe
  gearshift train my.yaml --max-steps 500 --set data.seq_len=256
  gearshift train my.yaml --resume auto             # continue the newest run of this name
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift train`` with CONFIG, ``--set`` and the everyday knobs."""
    p = sub.add_parser("train", help="train from a config (no config: the embedded default)",
                       description="Train a model. With no CONFIG, runs the embedded default: "
                       "a small byte-level Llama trained on the Python reference manual.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train, and print where the run went; the exit code."""
    from gearshift.run import train

    resolved = resolve_args(args)
    return report_run(lambda: train(resolved.config, audit=resolved.audit))


def report_run(start: Callable[[], RunResult]) -> int:
    """Run ``start`` and print the run directory, steps, eval loss and final model.

    Returns:
        0, or the exit code of a graceful stop (``128 + signal``).
    """
    from gearshift.train import TrainingInterrupted

    try:
        result = start()
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
    if "memory/peak_mb" in m:
        print(f"peak memory: {m['memory/peak_mb']:,.0f} MiB")
    if result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    print(f"curves: tensorboard --logdir {RunPaths(result.run_dir).tensorboard}")
    return 0
