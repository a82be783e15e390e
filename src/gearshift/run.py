"""``gearshift.train(config)``: look the task up, build its parts, train them, start to finish."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gearshift.config import Config, load_config
from gearshift.errors import CheckpointError
from gearshift.rundir import RunPaths, find_auto_resume
from gearshift.tasks import TASKS
from gearshift.train import Callback, RunResult, Trainer
from gearshift.transforms import TransformChain, build_transforms


def resolve_resume(config: Config, resume: str | Path | None) -> Path | None:
    """Turn ``--resume RUN_DIR|auto`` into a run directory (None: start fresh)."""
    target = resume if resume is not None else config.resume
    if target is None:
        return None
    if str(target) == "auto":
        found = find_auto_resume(config.output_dir, config.name)
        if found is None:
            print(f"--resume auto: no earlier '{config.name}' run with checkpoints under "
                  f"{config.output_dir}; starting a new run", file=sys.stderr)
        return found
    path = Path(target)
    paths = RunPaths(path)
    if paths.config.is_file() and not paths.checkpoints.is_dir():
        raise CheckpointError(f"no valid checkpoint in {paths.checkpoints}: the run stopped before "
                              f"its first checkpoint; start it again with "
                              f"`gearshift train {paths.config}`")
    if not paths.checkpoints.is_dir():
        raise CheckpointError(f"{path} is not a run directory with checkpoints "
                              "(expected RUN_DIR/checkpoints/); check the path")
    return path


def train(config: Config | Mapping[str, Any] | str | Path | None = None, *,
          resume: str | Path | None = None, callbacks: Iterable[Callback] = (),
          audit: dict[str, Any] | None = None, run_dir: str | Path | None = None) -> RunResult:
    """Run the task described by ``config`` (``task:``, default ``lm``).

    Args:
        config: a :class:`Config`, dict, YAML path, or None for the embedded default.
        resume: a run directory or ``"auto"``; overrides ``config.resume``.
        callbacks: extra :class:`Callback` instances.
        audit: where each non-default value came from (written to ``overrides.json``).
        run_dir: write the run into this directory instead of a new
            ``<output_dir>/<name>-<time>`` (with ``resume``, the run being continued).

    Returns:
        The :class:`RunResult` (run directory, final step, eval metrics before and after).

    Example:
        >>> result = train({"training": {"max_steps": 20}})
        >>> result.metrics["eval/loss"] < result.metrics["eval/loss_before"]
        True
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    resume_dir = resolve_resume(cfg, resume)
    task = TASKS[cfg.task](cfg)  # the name was validated with the config
    parts = task.build()
    trainer = Trainer(parts.model, parts.train_data, cfg, eval_data=parts.eval_data,
                      callbacks=[*callbacks, *parts.callbacks], resume_from=resume_dir,
                      run_dir=run_dir, tokenizer=parts.tokenizer, collate_fn=parts.collate_fn,
                      audit=audit, task=task,
                      transforms=TransformChain([*build_transforms(cfg).transforms,
                                                 *parts.transforms]))
    result = trainer.fit()
    result.metrics.update(parts.result_metrics)
    return result
