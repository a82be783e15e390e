"""``gearshift train [CONFIG]``: train from a config (no config: the embedded default)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gearshift.cli.options import add_config_args, resolve_args
from gearshift.errors import UsageError
from gearshift.rundir import RunPaths

if TYPE_CHECKING:
    from gearshift.cli.report_hook import ReportOnEnd
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
  gearshift train my.yaml --run-dir runs/exp1        # this directory, not runs/<name>-<time>
  gearshift train my.yaml --set report.enabled=false # no RUN_DIR/report/ at the end
  gearshift launch --num_processes 4 -- train my.yaml # 4 processes (see gearshift launch -h)
  gearshift train examples/reinforce.yaml --set model.path=runs/sft_chat-<time>/final
                                                    # REINFORCE (task: reinforce, rl: section)
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift train`` with CONFIG, ``--set`` and the everyday knobs."""
    p = sub.add_parser("train", help="train from a config (no config: the embedded default)",
                       description="Train a model. With no CONFIG, runs the embedded default: "
                       "a small byte-level Llama trained on the Python reference manual.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run-dir", metavar="DIR",
                   help="write the run into DIR (created if missing, must hold no run yet) "
                        "instead of OUTPUT_DIR/NAME-YYYYmmdd-HHMMSS")
    return p


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train, and print where the run went; the exit code."""
    from gearshift.cli.report_hook import ReportOnEnd
    from gearshift.run import train

    resolved = resolve_args(args)
    resume = resolved.config.resume
    run_dir = _fresh_run_dir(args.run_dir, resumed=resume is not None)
    if run_dir is not None and resume not in (None, "auto") and Path(resume) != run_dir:
        raise UsageError(f"--run-dir {run_dir} and --resume {resume} name two directories; a "
                         "resumed run stays in its own directory: drop --run-dir")
    hook = ReportOnEnd()
    return report_run(lambda: train(resolved.config, audit=resolved.audit, callbacks=[hook],
                                    run_dir=run_dir), hook)


def _fresh_run_dir(value: str | None, *, resumed: bool) -> Path | None:
    """``--run-dir``: None, or a directory that holds no run yet (unless resuming)."""
    if value is None:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--run-dir {path} is a file; give a directory")
    # Under `gearshift launch` the first process checks: the others may start after it wrote
    # the run's config.yaml.
    first = int(os.environ.get("RANK", "0")) == 0
    if not resumed and first and RunPaths(path).config.exists():
        raise UsageError(f"--run-dir {path} already holds a run; continue it with `gearshift "
                         f"resume {path}`, or give an empty or new directory")
    return path


def report_run(start: Callable[[], RunResult], hook: ReportOnEnd | None = None) -> int:
    """Run ``start`` and print the run directory, steps, eval loss, final model and report.

    A run that stops early (Ctrl-C / SIGTERM, the NaN guard, an error) gets its report too.

    Returns:
        0, or the exit code of a graceful stop (``128 + signal``).
    """
    from gearshift.train import TrainingInterrupted

    try:
        result = start()
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        _report_after_stop(hook)
        return exc.exit_code
    except Exception:
        _report_after_stop(hook)
        raise
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # several processes (gearshift launch): the first one reports
    m = result.metrics
    print(f"run directory: {result.run_dir}")
    print(f"steps: {result.step}")
    if "eval/loss" in m:
        before = m.get("eval/loss_before")
        line = f"eval loss: {before:.4f} -> {m['eval/loss']:.4f}" if before is not None else \
            f"eval loss: {m['eval/loss']:.4f}"
        print(line + f" (perplexity {m['eval/ppl']:.2f})")
    for key in ("eval/reward", "eval/exact_match"):
        if key in m and "eval/loss" not in m:  # a task judged by its answers, not a loss
            before = m.get(f"{key}_before")
            shown = f"{before:.4f} -> {m[key]:.4f}" if before is not None else f"{m[key]:.4f}"
            print(f"{key.removeprefix('eval/').replace('_', ' ')}: {shown}")
    if "memory/peak_mb" in m:
        print(f"peak memory: {m['memory/peak_mb']:,.0f} MiB")
    if result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    print(f"curves: tensorboard --logdir {RunPaths(result.run_dir).tensorboard}")
    if hook is not None and hook.summary is not None:
        print(f"report: {hook.summary}")
    return 0


def _report_after_stop(hook: ReportOnEnd | None) -> None:
    summary = hook.write() if hook is not None else None
    if summary is not None:
        print(f"report: {summary}", file=sys.stderr)
