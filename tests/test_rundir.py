"""Run directories: the names in them and the typed readers (config, metrics, events, checkpoints,
final model), including what a killed run leaves behind."""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest

import gearshift as gs
from gearshift import rundir
from gearshift.errors import ConfigError, RunDirError

SRC = Path(__file__).resolve().parents[1] / "src" / "gearshift"


def test_paths_name_every_file_of_a_run(tmp_path: Path) -> None:
    paths = rundir.RunPaths(tmp_path / "run")
    assert paths.root == tmp_path / "run"
    assert [p.relative_to(paths.root).as_posix() for p in (
        paths.config, paths.overrides, paths.metrics, paths.events, paths.tensorboard,
        paths.checkpoints, paths.latest, paths.final, paths.report, paths.checkpoint(200),
    )] == ["config.yaml", "overrides.json", "metrics.jsonl", "events.jsonl", "tensorboard",
           "checkpoints", "checkpoints/latest", "final", "report", "checkpoints/step-00000200"]


def test_create_run_dir_never_reuses_a_name(tmp_path: Path) -> None:
    first = rundir.create_run_dir(tmp_path / "runs", "tiny")
    second = rundir.create_run_dir(tmp_path / "runs", "tiny")
    assert first.is_dir() and second.is_dir() and first != second
    assert first.name.startswith("tiny-") and first.parent == tmp_path / "runs"


def test_readers_on_a_real_run(make_config) -> None:
    result = gs.train(make_config(training={"max_steps": 8, "eval_every": 4, "log_every": 2}))
    run = result.run_dir

    config = rundir.read_run_config(run)
    assert isinstance(config, gs.Config)
    assert config.name == "tiny" and config.training.max_steps == 8

    metrics = rundir.read_metrics(run)
    losses = rundir.metric_series(metrics, "loss")
    assert [step for step, _ in losses] == [2, 4, 6, 8]
    assert all(math.isfinite(v) and v > 0 for _, v in losses)
    evals = rundir.metric_series(metrics, "eval/loss")
    assert [step for step, _ in evals] == [0, 4, 8]
    assert evals[-1][1] == pytest.approx(result.metrics["eval/loss"])

    events = rundir.read_events(run)
    assert events[0].kind == "start" and events[0].step == 0
    assert events[-1].kind == "end" and events[-1].step == 8
    assert events[-1].time is not None
    saved = rundir.read_events(run, "checkpoint")
    assert [e.step for e in saved] == [4, 8]
    assert saved[-1].fields["path"] == str(rundir.RunPaths(run).checkpoint(8))

    assert [c.step for c in rundir.list_checkpoints(run)] == [4, 8]
    latest = rundir.latest_checkpoint(run)
    assert latest is not None and latest.step == 8 and latest.path.name == "step-00000008"
    final = rundir.final_model_dir(run)
    assert final == run / "final" and (final / "config.json").is_file()


def test_read_overrides_and_missing_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert rundir.read_overrides(run) == {}
    assert rundir.read_metrics(run) == [] and rundir.read_events(run) == []
    assert rundir.list_checkpoints(run) == [] and rundir.latest_checkpoint(run) is None
    assert rundir.final_model_dir(run) is None
    audit = {"training.max_steps": {"value": 5, "source": "flag --max-steps"}}
    (run / "overrides.json").write_text(json.dumps(audit), encoding="utf-8")
    assert rundir.read_overrides(run) == audit
    (run / "overrides.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(RunDirError, match="overrides.json is not a JSON object"):
        rundir.read_overrides(run)


def test_run_config_missing_empty_or_invalid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunDirError, match="has no config.yaml; is it a gearshift run"):
        rundir.read_run_config(run)
    (run / "config.yaml").write_text("", encoding="utf-8")
    with pytest.raises(RunDirError, match="config.yaml is empty"):
        rundir.read_run_config(run)
    (run / "config.yaml").write_text("training:\n  max_stepz: 3\n", encoding="utf-8")
    assert rundir.read_run_config_dict(run) == {"training": {"max_stepz": 3}}
    with pytest.raises(ConfigError) as info:
        rundir.read_run_config(run)
    assert info.value.source == str(run / "config.yaml")
    assert "training.max_stepz: unknown key (did you mean 'max_steps'?)" in str(info.value)


def _write_lines(path: Path, *lines: str, torn: str = "") -> None:
    path.write_text("".join(line + "\n" for line in lines) + torn, encoding="utf-8")


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _write_lines(run / "metrics.jsonl", '{"step": 1, "loss": 2.5}', '{"step": 2, "loss": 2.0}',
                 torn='{"step": 3, "lo')
    _write_lines(run / "events.jsonl", '{"step": 0, "event": "start", "time": 1.5}',
                 torn='{"step": 2, "event": "chec')
    assert rundir.read_metrics(run) == [rundir.MetricRecord(1, {"loss": 2.5}),
                                        rundir.MetricRecord(2, {"loss": 2.0})]
    assert rundir.read_events(run) == [rundir.EventRecord(0, "start", 1.5, {})]


def test_a_corrupt_line_in_the_middle_names_file_and_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    _write_lines(metrics, '{"step": 1, "loss": 2.5}', '{"step": 2, "lo', '{"step": 3}')
    with pytest.raises(RunDirError) as info:
        rundir.read_metrics(run)
    assert str(info.value).startswith(f"{metrics}:2: not valid JSON")
    # A torn line followed by a newline is no longer the last write: corruption too.
    _write_lines(metrics, '{"step": 1}', '{"step": 2, "lo')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not valid JSON"):
        rundir.read_metrics(run)
    _write_lines(metrics, '{"step": 1}', '[1, 2]', '{"step": 3}')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not a JSON object"):
        rundir.read_metrics(run)
    _write_lines(metrics, '{"loss": 1.0}', '{"step": 3}')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:1: no integer 'step'"):
        rundir.read_metrics(run)
    _write_lines(run / "events.jsonl", '{"step": 1, "time": 2.0}', '{"step": 2, "event": "x"}')
    with pytest.raises(RunDirError, match=r"events.jsonl:1: no 'event' name"):
        rundir.read_events(run)


def test_non_finite_values_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rundir.append_record(path, {"step": 1, "loss": math.nan, "grad_norm": math.inf,
                                "phase": "foundation"})
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "step": 1, "loss": "nan", "grad_norm": "inf", "phase": "foundation"}
    (record,) = rundir.read_metrics(tmp_path)
    assert math.isnan(record.values["loss"]) and record.number("grad_norm") == math.inf
    assert record.values["phase"] == "foundation" and record.number("phase") is None


def test_a_new_writer_cuts_the_torn_tail_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write_lines(path, '{"step": 0, "event": "start"}', torn='{"step": 4, "ev')
    assert rundir.drop_torn_tail(path) is True
    assert rundir.drop_torn_tail(path) is False
    rundir.append_record(path, {"step": 4, "event": "resume"})
    assert [e.kind for e in rundir.read_events(tmp_path)] == ["start", "resume"]
    assert rundir.drop_torn_tail(tmp_path / "absent.jsonl") is False


def test_truncate_after_keeps_the_history_up_to_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, '{"step": 2, "loss": 3.0}', 'garbage', '{"step": 4, "loss": 2.0}',
                 '{"step": 4, "eval/loss": 2.2}', '{"step": 6, "loss": 1.0}', torn='{"st')
    assert rundir.truncate_after(path, 4) == {"step", "loss", "eval/loss"}
    assert [(r.step, r.values) for r in rundir.read_metrics(tmp_path)] == [
        (2, {"loss": 3.0}), (4, {"loss": 2.0}), (4, {"eval/loss": 2.2})]
    assert rundir.truncate_after(tmp_path / "absent.jsonl", 4) == set()


def test_latest_falls_back_to_the_highest_step(tmp_path: Path) -> None:
    paths = rundir.RunPaths(tmp_path)
    for step in (10, 200, 30):
        paths.checkpoint(step).mkdir(parents=True)
    (paths.checkpoints / ".tmp-step-00000300-1-ab").mkdir()  # a save in progress
    assert [c.step for c in rundir.list_checkpoints(tmp_path)] == [10, 30, 200]
    assert rundir.latest_checkpoint(tmp_path) == rundir.CheckpointEntry(
        200, paths.checkpoint(200))
    os.symlink("step-00000030", paths.latest)
    assert rundir.latest_checkpoint(tmp_path).step == 30
    os.remove(paths.latest)
    os.symlink("step-00000400", paths.latest)  # dangling: killed between rename and link
    assert rundir.latest_checkpoint(tmp_path).step == 200


def test_find_auto_resume_picks_the_newest_run_with_checkpoints(tmp_path: Path) -> None:
    assert rundir.find_auto_resume(tmp_path / "absent", "tiny") is None
    old, new, empty = (tmp_path / n for n in ("tiny-1", "tiny-2", "tiny-3"))
    for run in (old, new):
        rundir.RunPaths(run).checkpoints.mkdir(parents=True)
    empty.mkdir()
    os.utime(old, (1_000, 1_000))
    assert rundir.find_auto_resume(tmp_path, "tiny") == new
    assert rundir.find_auto_resume(tmp_path, "other") is None


def test_rundir_imports_no_upper_layer() -> None:
    for file in (SRC / "rundir").glob("*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("gearshift.train", "gearshift.tasks",
                                            "gearshift.cli", "gearshift.models")), (file, name)
