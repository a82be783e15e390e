"""``gearshift pipeline run|resume|status``: multi-stage runs handing a model from stage to stage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gearshift.cli.options import add_action_verb

NAME = "pipeline"

RUN_EPILOG = """\
each stage is a normal gearshift config (inline, or a YAML path relative to the pipeline file,
else to the working directory) run as a normal run directory; from: names an earlier stage
(its final/, merged into a full model when it is a LoRA adapter and the stage needs a full
model; handoff: adapter continues the adapter instead) or a model directory path.
every stage is validated before anything runs (each problem prefixed with its stage); each
stage's input is checked (validate_model_dir(load=True) and the sha256 manifest recorded when
it was handed over) before it starts; a failing stage stops the pipeline.
layout: OUTPUT_DIR/NAME-YYYYmmdd-HHMMSS/{pipeline.yaml,status.json,stages/<i>-<name>/,
        handoff/<i>-<name>.json,report/}
examples:
  gearshift pipeline run                          # the embedded default: pretrain, sft, rl, qat
  gearshift pipeline run examples/pipeline.yaml --set sft.training.max_steps=100
  gearshift pipeline run my.yaml --resume auto    # continue the newest pipeline of this name
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift pipeline`` with its actions ``run``, ``resume`` and ``status``."""
    p, actions = add_action_verb(
        sub, NAME, help="run stages in order, each handed the previous stage's model",
        description="Multi-stage training: each stage a normal run that starts from the model "
                    "an earlier stage produced, checked before a single step is spent; resume "
                    "after a crash at any point.")
    r = actions.add_parser("run", help="validate every stage, then run them in order",
                           description="Run PIPELINE (no file: the embedded four-stage default:"
                           " pretrain on the Python reference manual, chat fine-tuning with "
                           "LoRA-alpha phases, REINFORCE on the exact-match reward, BitNet "
                           "b1.58 quantization-aware training), then write report/.",
                           epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("pipeline", nargs="?", metavar="PIPELINE",
                   help="pipeline YAML file (default: the embedded four-stage default)")
    r.add_argument("--set", dest="sets", action="append", default=[],
                   metavar="STAGE.KEY.PATH=VALUE",
                   help="override a key of one stage's config (repeatable)")
    r.add_argument("--output-dir", metavar="DIR",
                   help="parent of the pipeline directory (default: the file's output_dir, "
                        "pipelines)")
    r.add_argument("--resume", metavar="{DIR,auto}",
                   help="continue DIR, or 'auto' for the newest pipeline of this name")
    r.add_argument("--no-report", action="store_true", help="write no report/ at the end")
    s = actions.add_parser("resume", help="continue a pipeline after a crash, kill or failure",
                           description="Skip the finished stages whose outputs still verify, "
                           "resume the interrupted stage from its newest checkpoint, run the "
                           "rest.")
    s.add_argument("dir", metavar="PIPELINE_DIR")
    s.add_argument("--no-report", action="store_true", help="write no report/ at the end")
    t = actions.add_parser("status", help="where each stage of a pipeline stands",
                           description="Print each stage's state, steps, time, metrics and "
                           "output (exit 0; 2 when DIR is not a pipeline directory).")
    t.add_argument("dir", metavar="PIPELINE_DIR")
    t.add_argument("--json", action="store_true", help="print status.json (with each running "
                   "stage's current step) as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Dispatch ``run``, ``resume`` or ``status``; the exit code."""
    if args.pipeline_command == "status":
        return _status(Path(args.dir), as_json=args.json)
    from gearshift.pipeline import resume_pipeline, run_pipeline
    from gearshift.pipeline.layout import PipelineError
    from gearshift.train import TrainingInterrupted

    callbacks = _stage_reports(not args.no_report)
    try:
        if args.pipeline_command == "resume":
            result = resume_pipeline(Path(args.dir), stage_callbacks=callbacks)
        else:
            result = run_pipeline(args.pipeline, sets=args.sets, output_dir=args.output_dir,
                                  resume=args.resume, stage_callbacks=callbacks)
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"pipeline directory: {result.pipeline_dir}")
    _print_table(result.stages)
    if result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    if not args.no_report:
        from gearshift.report.pipeline import write_pipeline_report

        print(f"report: {write_pipeline_report(result.pipeline_dir)}")
    return 0


def _stage_reports(enabled: bool) -> Any:
    if not enabled:
        return None
    from gearshift.cli.report_hook import ReportOnEnd

    return lambda stage: [ReportOnEnd()]


def _status(directory: Path, *, as_json: bool) -> int:
    from gearshift import rundir
    from gearshift.checkpoint.atomic import pid_alive
    from gearshift.pipeline import read_status

    status = read_status(directory)
    pid = status.get("pid")
    if status.get("state") == "running" and not (isinstance(pid, int) and pid_alive(pid)):
        status["state"] = "stopped"  # running on disk, but its process is gone (killed)
    for entry in status["stages"]:
        run_dir = directory / str(entry.get("run_dir"))
        if entry.get("state") in ("running", "interrupted", "failed") and \
                rundir.RunPaths(run_dir).events.is_file():
            live = rundir.run_status(run_dir)
            entry["progress"] = {"step": live.step, "total_steps": live.total_steps}
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"pipeline {status.get('name')}: {status.get('state')} ({directory})")
    _print_table(status["stages"])
    if status.get("reason"):
        print(f"stopped at stage {status.get('stopped_stage')}: {status['reason']}")
    if status["state"] in ("stopped", "failed", "interrupted"):
        print(f"continue with: gearshift pipeline resume {directory}")
    return 0


def _print_table(stages: list[dict[str, Any]]) -> None:
    print(f"{'#':<2} {'stage':<12} {'task':<10} {'state':<12} {'steps':>6} {'time':>8}  metrics")
    for e in stages:
        progress = e.get("progress")
        steps = e.get("steps") if e.get("steps") is not None else (
            f"{progress['step']}/{progress['total_steps']}" if progress else "-")
        seconds = f"{e['seconds']:.1f}s" if e.get("seconds") is not None else "-"
        m = e.get("metrics") or {}
        shown = ", ".join(f"{k.removeprefix('eval/')} {m[k]:.4g}" for k in
                          ("eval/loss", "eval/exact_match", "eval/reward") if k in m)
        print(f"{e['index']:<2} {e['name']:<12} {e.get('task', ''):<10} {e['state']:<12} "
              f"{steps!s:>6} {seconds:>8}  {shown}")
