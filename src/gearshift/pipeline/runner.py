"""Running a pipeline: each stage a normal run, handed a checked model, resumable at any point.

The runner knows nothing about what a stage trains: it resolves the stage's config, checks the
model it starts from, calls :func:`gearshift.run.train` on the stage's run directory (fresh, or
resumed from its newest checkpoint) and records the output. A stage that fails stops the
pipeline; ``resume`` skips the finished stages whose outputs still verify.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from gearshift import rundir
from gearshift.config import validate
from gearshift.errors import ConfigError, GearshiftError, Problem
from gearshift.models import validate_model_dir
from gearshift.pipeline.handoff import (
    check_handoff,
    dir_manifest,
    manifest_problems,
    prepare_handoff,
    record_handoff,
)
from gearshift.pipeline.layout import (
    STATUS_FORMAT,
    STATUS_VERSION,
    PipelineError,
    PipelinePaths,
    find_newest_pipeline,
    new_pipeline_dir,
    now,
    read_pipeline_yaml,
    read_status,
    write_json_atomic,
    write_yaml_atomic,
)
from gearshift.pipeline.spec import ResolvedPipeline, Stage, resolve_pipeline

#: Per stage, extra callbacks for its run (e.g. the CLI's report at the end of each stage).
StageCallbacks = Callable[[Stage], Iterable[Any]]


@dataclass
class PipelineResult:
    """Where a pipeline went and how each stage ended.

    Attributes:
        pipeline_dir: The pipeline directory.
        state: ``finished`` (every stage), else the state ``status.json`` holds.
        stages: ``status.json``'s stage entries (state, seconds, steps, metrics, output).
    """

    pipeline_dir: Path
    state: str
    stages: list[dict[str, Any]]

    @property
    def final_dir(self) -> Path | None:
        """The last stage's ``final/`` (None unless the pipeline finished)."""
        if self.state != "finished":
            return None
        return self.pipeline_dir / self.stages[-1]["run_dir"] / rundir.FINAL_DIR


def run_pipeline(source: str | Path | Mapping[str, Any] | None = None, *,
                 sets: Iterable[str] = (), output_dir: str | Path | None = None,
                 resume: str | Path | None = None,
                 stage_callbacks: StageCallbacks | None = None) -> PipelineResult:
    """Validate every stage, create the pipeline directory and run the stages in order.

    Args:
        source: A pipeline YAML path, a dict, or None for the embedded four-stage default.
        sets: ``STAGE.key.path=value`` overrides of stage configs.
        output_dir: Parent of the pipeline directory (default: the file's ``output_dir``).
        resume: ``"auto"`` continues the newest pipeline of this name under the output
            directory (a new one when there is none); a directory continues that one.
        stage_callbacks: Extra callbacks for each stage's run.

    Returns:
        The :class:`PipelineResult`.

    Raises:
        ConfigError: Every problem of the pipeline and of every stage, before anything runs.
        PipelineError: A hand-off that changed, or a stage that failed (status.json says which).

    Example:
        >>> result = run_pipeline("examples/pipeline.yaml")  # doctest: +SKIP
        >>> result.state, result.final_dir  # doctest: +SKIP
        ('finished', PosixPath('pipelines/default-20260101-120000/stages/3-qat/final'))
    """
    sets = list(sets)
    placeholder = Path(output_dir or "pipelines") / "pending"
    resolved = resolve_pipeline(source, placeholder, sets)  # every problem, before anything
    parent = Path(output_dir) if output_dir is not None else Path(resolved.output_dir)
    if resume is not None:
        target = find_newest_pipeline(parent, resolved.name) if str(resume) == "auto" \
            else Path(resume)
        if target is not None:
            print(f"resuming pipeline {target}", file=sys.stderr)
            if sets:
                print("note: --set is not applied when resuming: the pipeline keeps the "
                      f"configs resolved in {PipelinePaths(target).pipeline}", file=sys.stderr)
            return resume_pipeline(target, stage_callbacks=stage_callbacks)
        print(f"--resume auto: no earlier '{resolved.name}' pipeline under {parent}; starting "
              "a new one", file=sys.stderr)
    pipeline_dir = new_pipeline_dir(parent, resolved.name)
    resolved = resolve_pipeline(source, pipeline_dir, sets)
    paths = PipelinePaths(pipeline_dir)
    paths.root.mkdir(parents=True)
    with _lock(paths):
        write_yaml_atomic(paths.pipeline, resolved.to_dict())
        status = _new_status(resolved, paths)
        write_json_atomic(paths.status, status)
        for stage in resolved.stages:  # a model directory named by path: recorded now
            if stage.source == "path":
                _record_path_handoff(paths, stage)
        return _execute(paths, resolved.stages, status, stage_callbacks)


def resume_pipeline(pipeline_dir: str | Path, *,
                    stage_callbacks: StageCallbacks | None = None) -> PipelineResult:
    """Continue a pipeline: skip finished stages whose outputs still verify, resume the
    interrupted stage from its newest checkpoint, run the rest.

    Raises:
        PipelineError: Not a pipeline directory, a finished stage's output or a hand-off that
            changed (naming the stage and the file), or a stage that failed.
    """
    paths = PipelinePaths(pipeline_dir)
    status = read_status(paths.root)
    stages = load_stages(paths.root)
    with _lock(paths):
        return _execute(paths, stages, status, stage_callbacks)


def load_stages(pipeline_dir: str | Path) -> list[Stage]:
    """The stages of a pipeline directory, from its resolved ``pipeline.yaml``, validated."""
    data = read_pipeline_yaml(pipeline_dir)
    stages, problems = [], []
    for index, item in enumerate(data["stages"]):
        name = str(item.get("name", index)) if isinstance(item, dict) else str(index)
        try:
            config = validate(item["config"])
        except ConfigError as exc:
            problems.extend(Problem(f"stage {name}", str(p)) for p in exc.problems)
            continue
        except (KeyError, TypeError):
            problems.append(Problem(f"stage {name}", "no config in pipeline.yaml"))
            continue
        origin = item.get("from")
        source = None if origin is None else ("stage" if origin in
                                              [s.get("name") for s in data["stages"][:index]]
                                              else "path")
        stages.append(Stage(index, name, config, source, origin, item.get("handoff", "full")))
    if problems:
        raise ConfigError(problems, str(PipelinePaths(pipeline_dir).pipeline))
    return stages


# ---------------------------------------------------------------------------- the engine


def _execute(paths: PipelinePaths, stages: list[Stage], status: dict[str, Any],
             stage_callbacks: StageCallbacks | None) -> PipelineResult:
    status.update(state="running", pid=os.getpid(), failed_stage=None, reason=None)
    _save(paths, status)
    for stage in stages:
        entry = status["stages"][stage.index]
        if entry["state"] == "finished":
            _verify_finished(paths, stage, entry)
            print(f"stage {stage.name}: finished earlier, output verifies: skipped",
                  file=sys.stderr)
            continue
        if stage.source is not None:
            _check_input(paths, stage, stages)
        _run_stage(paths, stage, stages, status, stage_callbacks)
    status.update(state="finished", pid=None)
    _save(paths, status)
    return PipelineResult(paths.root, "finished", status["stages"])


def _run_stage(paths: PipelinePaths, stage: Stage, stages: list[Stage], status: dict[str, Any],
               stage_callbacks: StageCallbacks | None) -> None:
    from gearshift.run import train
    from gearshift.train import TrainingInterrupted

    entry = status["stages"][stage.index]
    run_dir = paths.stage(stage.dir_name)
    resumable = bool(rundir.list_checkpoints(run_dir)) if run_dir.is_dir() else False
    if run_dir.exists() and not resumable:
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep
    entry.update(state="running", started=entry.get("started") or now(), error=None)
    _save(paths, status)
    total = len(status["stages"])
    how = "resuming from its newest checkpoint" if resumable else "starting"
    print(f"== stage {stage.index + 1}/{total}: {stage.name} (task {stage.config.task}), {how}"
          f" -> {run_dir}", file=sys.stderr, flush=True)
    callbacks = list(stage_callbacks(stage)) if stage_callbacks is not None else []
    try:
        if resumable:
            result = train(stage.config, resume=run_dir, callbacks=callbacks)
        else:
            result = train(stage.config, run_dir=run_dir, audit=stage.audit,
                           callbacks=callbacks)
    except TrainingInterrupted:
        _stopped(paths, status, stage, "interrupted", "stopped by a signal; continue with "
                 f"`gearshift pipeline resume {paths.root}`")
        print(f"stage {stage.name} interrupted; continue the pipeline with `gearshift pipeline "
              f"resume {paths.root}`", file=sys.stderr)
        raise
    except GearshiftError as exc:
        _stopped(paths, status, stage, "failed", str(exc))
        raise PipelineError(_failure(paths, stage, str(exc)), exc.exit_code) from None
    except Exception as exc:  # a crash inside the stage: recorded, then reported with its trace
        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}"
        _stopped(paths, status, stage, "failed", reason)
        raise PipelineError(_failure(paths, stage, reason), 1) from None
    final = result.final_dir if result.final_dir is not None else run_dir / rundir.FINAL_DIR
    report = validate_model_dir(final, load=True)
    if not report.ok:
        reason = f"its final model is not valid:\n{report.message()}"
        _stopped(paths, status, stage, "failed", reason)
        raise PipelineError(_failure(paths, stage, reason), 1)
    for consumer in stages:  # recorded now, checked again before the consumer starts
        if consumer.source == "stage" and consumer.from_ == stage.name:
            _prepare(paths, consumer, stage)
    run_state = rundir.run_status(run_dir)
    manifest = dir_manifest(final)
    entry.update(state="finished", finished=now(), steps=result.step,
                 seconds=round(run_state.active_seconds, 2), resumes=run_state.resumes,
                 metrics={k: float(v) for k, v in result.metrics.items()
                          if isinstance(v, int | float) and math.isfinite(v)},
                 output={"path": str(final.relative_to(paths.root)) if final.is_relative_to(
                     paths.root) else str(final), "kind": report.kind,
                     "bytes": sum(e["bytes"] for e in manifest.values()),
                     "manifest": manifest})
    _save(paths, status)
    print(f"stage {stage.name}: finished, {result.step} steps, final model {final} "
          f"({report.kind})", file=sys.stderr, flush=True)


def _verify_finished(paths: PipelinePaths, stage: Stage, entry: dict[str, Any]) -> None:
    output = entry.get("output") or {}
    final = paths.root / str(output.get("path", ""))
    problems = manifest_problems(final, output.get("manifest") or {})
    if problems:
        run_dir = paths.stage(stage.dir_name)
        raise PipelineError(
            f"stage {stage.name}: finished, but its output {final} changed since:\n" +
            "\n".join(f"  - {p}" for p in problems) + "\nthe stages after it would start from "
            f"a different model. Restore the files, or export them again from the stage's last "
            f"checkpoint with `gearshift resume {run_dir}`")


def _check_input(paths: PipelinePaths, stage: Stage, stages: list[Stage]) -> None:
    file = paths.handoff(stage.dir_name)
    if not file.is_file():
        if stage.source == "path":
            _record_path_handoff(paths, stage)
        else:
            producer = next(s for s in stages if s.name == stage.from_)
            _prepare(paths, stage, producer)
    check_handoff(file, stage=stage.name)


def _prepare(paths: PipelinePaths, consumer: Stage, producer: Stage) -> None:
    # Absolute, so that a record read from another working directory names the same files.
    final_dir = (paths.stage(producer.dir_name) / rundir.FINAL_DIR).resolve()
    prepare_handoff(paths.handoff(consumer.dir_name), stage=consumer.name, source=producer.name,
                    final_dir=final_dir,
                    target=Path(str(consumer.config.model.path)), want=consumer.handoff)


def _record_path_handoff(paths: PipelinePaths, stage: Stage) -> None:
    record_handoff(paths.handoff(stage.dir_name), stage=stage.name,
                   source=f"path {stage.from_}", model_dir=Path(str(stage.config.model.path)))


def _stopped(paths: PipelinePaths, status: dict[str, Any], stage: Stage, state: str,
             reason: str) -> None:
    status["stages"][stage.index].update(state=state, error=reason)
    status.update(state=state, failed_stage=stage.name if state == "failed" else None,
                  stopped_stage=stage.name, reason=reason, pid=None)
    _save(paths, status)


def _failure(paths: PipelinePaths, stage: Stage, reason: str) -> str:
    return (f"stage {stage.name} failed, so the pipeline stopped (nothing after it ran): "
            f"{reason}\nits run directory: {paths.stage(stage.dir_name)}; after fixing the "
            f"cause, continue with `gearshift pipeline resume {paths.root}`")


def _new_status(resolved: ResolvedPipeline, paths: PipelinePaths) -> dict[str, Any]:
    return {"format": STATUS_FORMAT, "version": STATUS_VERSION, "name": resolved.name,
            "state": "pending", "created": now(), "updated": now(), "pid": None,
            "failed_stage": None, "stopped_stage": None, "reason": None,
            "stages": [{"index": s.index, "name": s.name, "task": s.config.task,
                        "from": s.from_, "handoff": s.handoff if s.from_ else None,
                        "state": "pending",
                        "run_dir": str(paths.stage(s.dir_name).relative_to(paths.root)),
                        "started": None, "finished": None, "seconds": None, "steps": None,
                        "resumes": 0, "metrics": {}, "output": None, "error": None}
                       for s in resolved.stages]}


def _save(paths: PipelinePaths, status: dict[str, Any]) -> None:
    status["updated"] = now()
    write_json_atomic(paths.status, status)


class _lock:
    """One process at a time in a pipeline directory."""

    def __init__(self, paths: PipelinePaths) -> None:
        self.lock = FileLock(str(paths.root / ".lock"))
        self.paths = paths

    def __enter__(self) -> None:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise PipelineError(f"another process is running the pipeline in {self.paths.root};"
                                " wait for it, or stop it first") from None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
