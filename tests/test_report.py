"""gearshift.report: statistics against hand-computed values on synthetic run directories, the
report of a run (finished, in progress, interrupted), the plots, and the import rule."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from scipy import stats as sps

import gearshift as gs
from gearshift import rundir
from gearshift.errors import RunDirError, UsageError
from gearshift.report import compare_runs, load_run, write_report
from gearshift.report.compare import run_outcome
from gearshift.report.stats import describe, verdict

# ---------------------------------------------------------------- synthetic run directories


def fake_run(root: Path, name: str, evals: list[tuple[int, Any]], *, losses: list[float] = (),
             events: list[dict[str, Any]] = (), seed: int = 1) -> Path:
    """A run directory written by hand: metrics.jsonl, events.jsonl and a config.yaml."""
    run = root / name
    run.mkdir(parents=True)
    lines = [{"step": i + 1, "loss": v, "lr": 0.01, "tokens_per_s": 1000.0}
             for i, v in enumerate(losses)]
    lines += [{"step": s, "eval/loss": v} for s, v in evals]
    lines.sort(key=lambda r: r["step"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    evs = [{"step": 0, "event": "start", "time": 100.0, "total_steps": 20}, *events]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    (run / "config.yaml").write_text(f"seed: {seed}\nname: {name}\n")
    return run


def end(step: int = 20, time: float = 160.0) -> dict[str, Any]:
    return {"step": step, "event": "end", "time": time, "peak_memory_mb": 512.0}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("synthetic")
    control = [
        fake_run(root, "a1", [(0, 5.0), (10, 3.5), (20, 3.0)], events=[end()], seed=1),
        # best 2.8 at step 10, final 3.2: 14% worse than its best, collapsed
        fake_run(root, "a2", [(0, 5.0), (10, 2.8), (20, 3.2)], events=[end()], seed=2),
        # a seed whose loss and eval went NaN: diverged, its final left out of the statistics
        fake_run(root, "a3", [(0, 5.0), (10, 3.1), (20, "nan")], losses=[4.0, "nan"],
                 events=[{"step": 20, "event": "diverged", "time": 150.0, "reason": "nan"}],
                 seed=3),
    ]
    better = [
        fake_run(root, f"b{i}", [(0, 5.0), (10, 2.5), (20, v)], events=[end()], seed=i)
        for i, v in ((1, 2.0), (2, 2.2), (3, 2.1))
    ]
    # a run with no eval at all: counted, but it has no final metric
    better.append(fake_run(root, "b4", [], losses=[4.0, 3.0], events=[end()], seed=4))
    single = [fake_run(root, "c1", [(0, 5.0), (20, 2.9)], events=[end()], seed=1)]
    return {"control": control, "better": better, "single": single}


def test_stats_match_hand_computed_values(synthetic: dict[str, list[Path]]) -> None:
    c = compare_runs(synthetic, metric="eval/loss", control="control")
    arms = c.stats["arms"]

    a = arms["control"]
    assert a["runs"] == 3 and a["diverged"] == 1 and a["collapsed"] == 1
    assert a["final"]["n"] == 2  # the NaN seed is left out
    assert a["final"]["mean"] == pytest.approx(3.1)
    assert a["final"]["std"] == pytest.approx(math.sqrt(0.02))
    half = 12.706204736174707 * math.sqrt(0.02) / math.sqrt(2)  # t(0.975, 1 df)
    assert a["final"]["ci95"] == pytest.approx([3.1 - half, 3.1 + half])
    assert a["best"]["mean"] == pytest.approx((3.0 + 2.8 + 3.1) / 3)
    assert a["step_of_best"]["mean"] == pytest.approx((20 + 10 + 10) / 3)
    assert a["vs_control"] is None

    b = arms["better"]
    assert b["runs"] == 4 and b["missing_metric"] == 1 and b["diverged"] == 0
    assert b["final"]["mean"] == pytest.approx(2.1) and b["final"]["std"] == pytest.approx(0.1)
    half = 4.302652729749464 * 0.1 / math.sqrt(3)  # t(0.975, 2 df)
    assert b["final"]["ci95"] == pytest.approx([2.1 - half, 2.1 + half])
    vs = b["vs_control"]
    assert vs["difference"] == pytest.approx(-1.0)
    # Welch by hand: variances of the means, the t statistic, Welch-Satterthwaite df.
    va, vb = 0.02 / 2, 0.01 / 3
    t = -1.0 / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    assert vs["p_value"] == pytest.approx(2 * sps.t.sf(abs(t), df))
    assert vs["p_value"] == pytest.approx(0.0215, abs=1e-4)
    # Every bootstrap difference lies between the extreme resampled means: [-1.2, -0.8].
    low, high = vs["ci95"]
    assert -1.2 - 1e-9 <= low <= high <= -0.8 + 1e-9
    assert vs["verdict"] == "better"

    s = arms["single"]
    assert s["final"] == {"n": 1, "mean": 2.9, "std": None, "ci95": None}
    assert s["vs_control"]["difference"] == pytest.approx(-0.2)
    assert s["vs_control"]["ci95"] is None and s["vs_control"]["p_value"] is None
    assert s["vs_control"]["verdict"] == "no clear difference"
    assert c.verdicts() == {"better": "better", "single": "no clear difference"}


def test_maximize_flips_the_verdict_and_the_best(synthetic: dict[str, list[Path]]) -> None:
    c = compare_runs({"control": synthetic["control"], "better": synthetic["better"]},
                     metric="eval/loss", control="control", maximize=True)
    assert c.verdicts() == {"better": "worse"}
    assert c.stats["arms"]["better"]["best"]["mean"] == pytest.approx(5.0)


def test_collapse_and_divergence_detection(synthetic: dict[str, list[Path]],
                                           tmp_path: Path) -> None:
    a1, a2, a3 = (load_run(p) for p in synthetic["control"])
    out = run_outcome(a2, "eval/loss", maximize=False, collapse_tolerance=0.1)
    assert (out["final"], out["best"], out["step_of_best"]) == (3.2, 2.8, 10)
    assert out["collapsed"] and not out["diverged"]
    # 14% worse than the best: not a collapse when 20% is tolerated
    assert not run_outcome(a2, "eval/loss", maximize=False, collapse_tolerance=0.2)["collapsed"]
    out = run_outcome(a3, "eval/loss", maximize=False, collapse_tolerance=0.1)
    assert out["diverged"] and not out["collapsed"] and math.isnan(out["final"])
    assert out["state"] == "diverged"
    # finite metrics, but the NaN guard stopped the run: diverged all the same
    guard = fake_run(tmp_path, "guard", [(0, 5.0), (10, 3.0)], events=[
        {"step": 10, "event": "diverged", "time": 130.0, "reason": "3 non-finite steps"}])
    assert load_run(guard).diverged
    # a non-finite training loss alone is a divergence too
    nan_loss = fake_run(tmp_path, "nanloss", [(0, 5.0)], losses=[3.0, "inf"], events=[end()])
    assert load_run(nan_loss).diverged and not load_run(synthetic["control"][0]).diverged


def test_stats_json_is_valid_json_with_non_finite_values(synthetic: dict[str, list[Path]],
                                                         tmp_path: Path) -> None:
    c = compare_runs(synthetic, metric="eval/loss", control="control")
    written = c.write(tmp_path / "report")
    assert {p.name for p in written} == {"stats.json", "summary.md", "metric.png", "lr.png",
                                         "final_metric.png"}
    text = (tmp_path / "report" / "stats.json").read_text()
    assert "NaN" not in text  # JSON has no NaN: stored as "nan", like metrics.jsonl
    saved = json.loads(text)
    assert saved["arms"]["control"]["per_run"][2]["final"] == "nan"
    assert saved["arms"]["better"]["vs_control"]["verdict"] == "better"
    for png in ("metric.png", "lr.png", "final_metric.png"):
        image = matplotlib.image.imread(tmp_path / "report" / png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    md = (tmp_path / "report" / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| better | 4 | 2.1 ± 0.1"))
    assert row.endswith("| -1 | [" + row.split("| -1 | [")[1].split("]")[0] + "] | 0.0215 | better |")


def test_compare_errors_name_the_problem(synthetic: dict[str, list[Path]],
                                         tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="control arm 'nope' is not one of the arms: control"):
        compare_runs({"control": synthetic["control"]}, metric="eval/loss", control="nope")
    with pytest.raises(UsageError, match=r"no run logged the metric 'eval/acc'; metrics logged: "
                                         r"eval/loss, loss, lr, tokens_per_s"):
        compare_runs(synthetic, metric="eval/acc", control="control")
    with pytest.raises(RunDirError, match="is not a gearshift run directory"):
        compare_runs({"x": [tmp_path]}, metric="eval/loss", control="x")


def test_describe_and_verdict_edges() -> None:
    assert describe([]) == {"n": 0, "mean": None, "std": None, "ci95": None}
    assert describe([1.0, float("nan"), 3.0])["n"] == 2
    assert verdict(0.5, [0.2, 0.8], 0.01, maximize=False) == "worse"
    assert verdict(0.5, [0.2, 0.8], 0.01, maximize=True) == "better"
    assert verdict(0.5, [0.2, 0.8], 0.2, maximize=True) == "no clear difference"
    assert verdict(None, None, None, maximize=True) == "no clear difference"


# ---------------------------------------------------------------- reports of real runs


class ReportMidRun(gs.Callback):
    """Writes the report while the run trains (a run in progress), then lets it go on."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, None

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.step == self.at:
            written = write_report(trainer.run_dir)
            self.seen = (load_run(trainer.run_dir).status, [p.name for p in written],
                         (trainer.run_dir / "report" / "summary.md").read_text())


class InterruptAt(gs.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.step == self.at:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled gracefully


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_report_of_a_run_in_progress_and_finished(make_config) -> None:
    cfg = make_config(training={"max_steps": 10, "eval_every": 4, "log_every": 1},
                      faults={"nan_at_steps": [3]})
    mid = ReportMidRun(at=6)
    result = gs.train(cfg, callbacks=[mid])
    status, names, md = mid.seen
    assert status.state == "running" and status.total_steps == 10
    assert names == ["loss.png", "eval.png", "lr.png", "grad_norm.png", "summary.md"]
    assert "- status: in progress, or killed" in md and "- steps: 6 of 10" in md
    assert "| 2 | nonfinite_skip |" in md

    written = write_report(result.run_dir)
    report = result.run_dir / "report"
    assert [p.name for p in written] == names
    for p in written[:-1]:
        assert_png(p)
    md = (report / "summary.md").read_text()
    assert "- status: finished" in md and "- steps: 10 of 10" in md
    final = rundir.metric_series(rundir.read_metrics(result.run_dir), "eval/loss")[-1][1]
    assert "| eval/loss | " in md and f"{final:.4g}" in md
    assert "peak memory: " in md and "(not recorded yet)" not in md
    assert "| 2 | nonfinite_skip |" in md  # the NaN of step 3 was skipped at step 2
    assert "| optimizer | adamw, lr 0.003" in md


def test_report_of_an_interrupted_run_and_cli(make_config, cli) -> None:
    cfg = make_config(training={"max_steps": 12, "eval_every": 4, "log_every": 1},
                      checkpoint={"every": 4})
    with pytest.raises(gs.TrainingInterrupted):
        gs.train(cfg, callbacks=[InterruptAt(5)])
    run = next((Path(cfg["output_dir"])).iterdir())
    code, out, err = cli("report", str(run))
    assert code == 0, err
    assert f"run: {run} (interrupted, step 5)" in out
    assert f"wrote {run / 'report' / 'summary.md'}" in out
    md = (run / "report" / "summary.md").read_text()
    assert "- status: interrupted" in md and "| 5 | interrupted | signal=2" in md
    code, out, err = cli("report", str(run / "nope"))
    assert code == 2 and "is not a directory" in err and "Traceback" not in err
    code, out, err = cli("report", str(run / "checkpoints"))
    assert code == 2 and "is not a gearshift run directory" in err


def test_report_with_phases_marks_transitions(make_config) -> None:
    cfg = make_config(
        training={"max_steps": 14, "eval_every": 7, "log_every": 1},
        lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        phases={"window": 4, "patience": 1, "phases": [
            {"name": "foundation", "alpha": 8, "min_steps": 2, "max_steps": 5},
            {"name": "balance", "alpha": 16}]})
    result = gs.train(cfg)
    names = [p.name for p in write_report(result.run_dir)]
    assert "alpha.png" in names and "grad_stability.png" in names
    md = (result.run_dir / "report" / "summary.md").read_text()
    move = rundir.read_events(result.run_dir, "phase_transition")[0]
    assert f"| {move.step} | foundation | balance | 8 -> 16 |" in md
    assert f"| {move.fields['reason']} |" in md


def test_report_is_written_at_the_end_of_gearshift_train(make_config, cli, tmp_path) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(make_config(training={"max_steps": 4, "eval_every": 2})))
    code, out, err = cli("train", str(path), "--run-dir", str(tmp_path / "mine"))
    assert code == 0, err
    assert f"report: {tmp_path / 'mine' / 'report' / 'summary.md'}" in out
    assert (tmp_path / "mine" / "report" / "loss.png").is_file()
    code, out, err = cli("train", str(path), "--run-dir", str(tmp_path / "mine"))
    assert code == 2 and "already holds a run; continue it with `gearshift resume" in err
    code, out, err = cli("train", str(path), "--set", "report.enabled=false")
    assert code == 0, err
    run = Path(out.split("run directory: ")[1].split("\n")[0])
    assert "report:" not in out and not (run / "report").exists()


def test_report_never_imports_the_trainer() -> None:
    code = ("import sys, gearshift.report, gearshift.report.study, gearshift.cli.main; "
            "bad = sorted(m for m in sys.modules if m == 'gearshift.run' or m.startswith(("
            "'gearshift.train', 'gearshift.tasks'))); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and the package still hands out the trainer on first use
    proc = subprocess.run([sys.executable, "-c", "import gearshift as gs, gearshift.train; "
                           "print(callable(gs.train), gs.Trainer.__name__)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "Trainer"], proc.stderr


def test_run_status_sums_the_segments_of_a_resumed_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "resumed", [(0, 5.0)], events=[
        {"step": 4, "event": "checkpoint", "time": 110.0, "peak_memory_mb": 300.0},
        # killed here; resumed much later from step 4
        {"step": 4, "event": "resume", "time": 500.0, "checkpoint": "step-00000004"},
        {"step": 8, "event": "checkpoint", "time": 520.0, "peak_memory_mb": 350.5},
        {"step": 10, "event": "end", "time": 530.0, "peak_memory_mb": 340.0}])
    status = rundir.run_status(run)
    assert status.state == "finished" and status.step == 10 and status.total_steps == 20
    assert status.resumes == 1 and status.peak_memory_mb == 350.5
    assert status.active_seconds == pytest.approx((110 - 100) + (530 - 500))
    killed = fake_run(tmp_path, "killed", [(0, 5.0)], events=[
        {"step": 4, "event": "checkpoint", "time": 110.0}])
    assert rundir.run_status(killed).state == "running"
    assert rundir.run_status(killed).peak_memory_mb is None


def test_a_run_stopped_by_the_nan_guard_reads_as_diverged(make_config) -> None:
    cfg = make_config(training={"max_steps": 10, "eval_every": 4, "log_every": 1},
                      checkpoint={"every": 4}, faults={"nan_at_steps": [6] * 9},
                      recovery={"max_consecutive_nonfinite": 3, "max_rollbacks": 1})
    with pytest.raises(gs.TrainingDiverged):
        gs.train(cfg)
    (run,) = Path(cfg["output_dir"]).iterdir()
    (event,) = rundir.read_events(run, "diverged")
    assert "after 1 rollback(s)" in event.fields["reason"]
    data = load_run(run)
    assert data.status.state == "diverged" and data.diverged
    write_report(run)
    md = (run / "report" / "summary.md").read_text()
    assert "- status: diverged (stopped by the NaN / out-of-memory guard)" in md
    assert "| rollback |" in md and "| diverged |" in md


def test_a_run_rolled_back_after_non_finite_steps_still_counts_as_diverged(
        make_config) -> None:
    # three NaN steps in a row at step 6: rolled back to step 4 at half the LR, then finished
    cfg = make_config(training={"max_steps": 10, "eval_every": 4, "log_every": 1},
                      checkpoint={"every": 4}, faults={"nan_at_steps": [6] * 3},
                      recovery={"max_consecutive_nonfinite": 3, "max_rollbacks": 1})
    result = gs.train(cfg)
    assert result.step == 10
    data = load_run(result.run_dir)
    assert len(data.events_of("nonfinite_skip")) == 3 and len(data.events_of("rollback")) == 1
    assert data.status.state == "finished"
    assert all(math.isfinite(v) for _, v in data.series("loss"))
    assert data.diverged
    out = run_outcome(data, "eval/loss", maximize=False, collapse_tolerance=0.1)
    assert out["diverged"] and out["state"] == "finished"


def test_report_is_written_when_a_cli_run_stops_early_and_after_resume(
        make_config, cli, tmp_path) -> None:
    import yaml

    from gearshift.cli.report_hook import ReportOnEnd
    from gearshift.cli.train import report_run
    from gearshift.run import train

    # Ctrl-C at step 5: the path `gearshift train` and `gearshift resume` take
    cfg = make_config(training={"max_steps": 8, "eval_every": 4, "log_every": 1},
                      checkpoint={"every": 4})
    hook = ReportOnEnd()
    code = report_run(lambda: train(cfg, callbacks=[hook, InterruptAt(5)],
                                    run_dir=tmp_path / "stopped"), hook)
    summary = tmp_path / "stopped" / "report" / "summary.md"
    assert code == 128 + signal.SIGINT and hook.summary == summary
    assert "- status: interrupted" in summary.read_text()
    code, out, err = cli("resume", str(tmp_path / "stopped"))
    assert code == 0, err
    assert f"report: {summary}" in out
    md = summary.read_text()
    assert "- status: finished" in md and "| resume |" in md

    # the NaN guard stops the run (exit 3): the report says it diverged
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(make_config(
        training={"max_steps": 8, "eval_every": 4}, checkpoint={"enabled": False},
        faults={"nan_at_steps": [3] * 3}, recovery={"max_consecutive_nonfinite": 3})))
    code, out, err = cli("train", str(path), "--run-dir", str(tmp_path / "nan"))
    summary = tmp_path / "nan" / "report" / "summary.md"
    assert code == 3 and f"report: {summary}" in err and "Traceback" not in err
    assert "- status: diverged" in summary.read_text()
    # report.enabled: false is obeyed on a stop too
    code, out, err = cli("train", str(path), "--run-dir", str(tmp_path / "quiet"),
                         "--set", "report.enabled=false")
    assert code == 3 and not (tmp_path / "quiet" / "report").exists()
