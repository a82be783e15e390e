"""gearshift compare: a real study of arms x seeds (tiny runs, separate processes), rerun and
resume after a kill, existing run directories, and every bad input reported before any run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import yaml

from conftest import tiny_config
from gearshift import rundir
from gearshift.report.study import threads_per_job

pytestmark = pytest.mark.slow


def study_file(root: Path, corpus: Path, name: str = "tiny-study",
               **extra: Any) -> Path:
    base = tiny_config(root, corpus, training={"max_steps": 8, "eval_every": 4,
                                               "log_every": 1},
                       checkpoint={"every": 2, "keep_last": 10})
    for key in ("output_dir", "seed", "name"):
        base.pop(key)
    spec = {"name": name, "base": base, "seeds": [1, 2],
            "arms": [{"name": "control", "set": {"schedule.name": "constant",
                                                 "optim.learning_rate": 0.05}},
                     {"name": "warmup", "set": {"schedule.name": "warmup_cosine",
                                                "schedule.warmup_ratio": 0.25,
                                                "optim.learning_rate": 0.05}}],
            "control": "control", "metric": "eval/loss",
            "output_dir": str(root / "compare"), **extra}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def gearshift(*args: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gearshift", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gearshift.data import pydoc_topics

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(pydoc_topics()[:40])[:24_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Any]:
    """One study, 2 arms x 2 seeds, run once with --jobs 2 for the whole module."""
    root = tmp_path_factory.mktemp("study")
    path = study_file(root, corpus)
    proc = gearshift("compare", str(path), "--jobs", "2", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (folder,) = (root / "compare").iterdir()
    return {"root": root, "path": path, "folder": folder, "out": proc.stdout}


def comparable(stats: dict[str, Any]) -> dict[str, Any]:
    """stats.json without what depends on the clock or the folder (time, throughput, paths)."""
    out = json.loads(json.dumps(stats))
    for arm in out["arms"].values():
        arm.pop("time_s"), arm.pop("tokens_per_s")
        for run in arm["per_run"]:
            run.pop("time_s"), run.pop("tokens_per_s"), run.pop("run")
    return out


def test_study_runs_every_arm_and_seed(study: dict[str, Any]) -> None:
    folder = study["folder"]
    assert folder.name.startswith("tiny-study-")
    runs = sorted(p.name for p in (folder / "runs").iterdir())
    assert runs == ["control-seed1", "control-seed2", "warmup-seed1", "warmup-seed2"]
    for name in runs:
        run = folder / "runs" / name
        assert rundir.run_status(run).state == "finished"
        assert rundir.read_run_config(run).seed == int(name[-1])
        assert (run / "report" / "summary.md").is_file()  # gearshift train's own report
        assert (folder / "logs" / f"{name}.log").is_file()
    # same seed: same initial weights and data in every arm -> same eval loss before step 1
    for seed in (1, 2):
        before = {arm: rundir.metric_series(rundir.read_metrics(
            folder / "runs" / f"{arm}-seed{seed}"), "eval/loss")[0]
            for arm in ("control", "warmup")}
        assert before["control"] == before["warmup"] and before["control"][0] == 0
    lr = {arm: rundir.metric_series(rundir.read_metrics(folder / "runs" / f"{arm}-seed1"), "lr")
          for arm in ("control", "warmup")}
    assert {v for step, v in lr["control"] if step > 3} == {0.05}  # after the base's warmup
    assert max(v for _, v in lr["warmup"]) == pytest.approx(0.05)
    assert lr["warmup"][-1][1] < 0.025  # the cosine decays; the constant does not

    report = folder / "report"
    assert {p.name for p in report.iterdir()} == {"stats.json", "summary.md", "metric.png",
                                                  "lr.png", "final_metric.png"}
    for png in ("metric.png", "lr.png", "final_metric.png"):
        assert matplotlib.image.imread(report / png).std() > 0
    stats = json.loads((report / "stats.json").read_text())
    assert stats["metric"] == "eval/loss" and stats["control"] == "control"
    for arm in ("control", "warmup"):
        a = stats["arms"][arm]
        finals = [rundir.metric_series(rundir.read_metrics(folder / "runs" / f"{arm}-seed{k}"),
                                       "eval/loss")[-1][1] for k in (1, 2)]
        assert a["runs"] == 2 and a["final"]["n"] == 2
        assert a["final"]["mean"] == pytest.approx(sum(finals) / 2)
    vs = stats["arms"]["warmup"]["vs_control"]
    assert vs["verdict"] in ("better", "worse", "no clear difference")
    assert study["out"].count("starting") == 4
    assert f"warmup: final eval/loss {stats['arms']['warmup']['final']['mean']:.4f} over 2 " \
           f"run(s), diverged 0, collapsed {stats['arms']['warmup']['collapsed']}: " \
           f"{vs['verdict']}" in study["out"]
    md = (report / "summary.md").read_text()
    assert "| schedule.name | \"constant\" | \"warmup_cosine\" |" in md
    assert (f"gearshift train {folder / 'base.yaml'} --set schedule.name=constant --set "
            "optim.learning_rate=0.05 --set seed=2") in md


def test_rerun_skips_finished_runs_and_gives_the_same_stats(study: dict[str, Any]) -> None:
    stats = (study["folder"] / "report" / "stats.json").read_text()
    proc = gearshift("compare", str(study["path"]), cwd=study["root"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already finished; skipped") == 4 and "starting" not in proc.stdout
    assert len(list((study["root"] / "compare").iterdir())) == 1  # the same folder
    assert (study["folder"] / "report" / "stats.json").read_text() == stats


def test_killed_study_resumes_without_training_anything_twice(study: dict[str, Any],
                                                              corpus: Path,
                                                              tmp_path: Path) -> None:
    path = study_file(tmp_path, corpus, output_dir=str(tmp_path / "killed"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # --jobs 2 as in the straight study: the same threads per run, so the same numbers
    proc = subprocess.Popen([sys.executable, "-m", "gearshift", "compare", str(path), "--jobs",
                             "2"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    victim: Path | None = None
    try:
        while time.time() < deadline and victim is None:  # kill once a run is mid-way
            for run in (tmp_path / "killed").glob("*/runs/*-seed*"):
                latest = rundir.latest_checkpoint(run)
                if latest is not None and latest.step < 8:
                    victim = run
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the study and every run it started
        proc.wait()
    assert victim is not None, "no run checkpointed before the deadline"
    folder = victim.parent.parent
    before = {run.name: (rundir.run_status(run).state, rundir.read_events(run))
              for run in (folder / "runs").iterdir()}
    assert before[victim.name][0] == "running"  # killed: no closing event

    rerun = gearshift("compare", str(path), "--jobs", "2", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{victim.name}: resuming" in rerun.stdout
    for name, (state, events) in before.items():
        run = folder / "runs" / name
        if state == "finished":
            assert f"{name}: already finished; skipped" in rerun.stdout
            assert rundir.read_events(run) == events  # not trained again
            continue
        kinds = [e.kind for e in rundir.read_events(run)]
        assert kinds[-1] == "end"
        if rundir.latest_checkpoint(run) is not None and "checkpoint" in [e.kind for e in events]:
            assert kinds.count("start") == 1 and kinds.count("resume") == 1
        steps = [r.step for r in rundir.read_metrics(run) if "loss" in r.values]
        assert steps == list(range(1, 9))  # each step once in the history
    killed = json.loads((folder / "report" / "stats.json").read_text())
    straight = json.loads((study["folder"] / "report" / "stats.json").read_text())
    assert comparable(killed) == comparable(straight)


def test_compare_existing_run_dirs(study: dict[str, Any], tmp_path: Path) -> None:
    runs = study["folder"] / "runs"
    proc = gearshift("compare", str(runs / "control-seed1"), str(runs / "warmup-seed1"),
                     "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "control-seed1: final eval/loss" in proc.stdout and "(control)" in proc.stdout
    assert "warmup-seed1: final eval/loss" in proc.stdout
    assert "no clear difference" in proc.stdout  # one run per arm: nothing can be told
    (out,) = (tmp_path / "out").iterdir()
    stats = json.loads((out / "report" / "stats.json").read_text())
    assert set(stats["arms"]) == {"control-seed1", "warmup-seed1"}
    assert stats["arms"]["warmup-seed1"]["vs_control"]["p_value"] is None


def test_an_invalid_arm_is_reported_before_anything_runs(cli, tmp_path: Path,
                                                         corpus_file: Path) -> None:
    path = study_file(tmp_path, corpus_file)
    spec = yaml.safe_load(path.read_text())
    spec["arms"][0]["set"]["optim.learning_rate"] = -1
    spec["arms"][1]["set"]["schedule.name"] = "cosinus"
    spec["arms"].append({"name": "typo", "set": {"training.max_step": 5}})
    path.write_text(yaml.safe_dump(spec))
    code, out, err = cli("compare", str(path))
    assert code == 2 and "Traceback" not in err
    assert "(3 problems)" in err
    assert "arm control: optim.learning_rate: Input should be greater than 0" in err
    assert "arm warmup: schedule.name: unknown schedule 'cosinus'" in err
    assert "arm typo: training.max_step: unknown key (did you mean 'max_steps'?)" in err
    assert not (tmp_path / "compare").exists()  # nothing ran, no folder made


def test_bad_study_files_and_arguments(cli, tmp_path: Path, corpus_file: Path) -> None:
    path = study_file(tmp_path, corpus_file)
    spec = yaml.safe_load(path.read_text())
    spec["control"] = "baseline"
    spec["arms"][1]["name"] = "control"
    spec["seedz"] = [1]
    path.write_text(yaml.safe_dump(spec))
    code, _, err = cli("compare", str(path))
    assert code == 2 and "seedz: Extra inputs are not permitted" in err
    del spec["seedz"]
    path.write_text(yaml.safe_dump(spec))
    code, _, err = cli("compare", str(path))
    assert code == 2 and "arm name 'control' is used twice" in err
    assert "control: 'baseline' is not an arm; arms: control, control" in err
    code, _, err = cli("compare", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err
    code, _, err = cli("compare", str(tmp_path), "--jobs", "0")
    assert code == 2 and "--jobs must be 1 or more" in err
    code, _, err = cli("compare", str(tmp_path / "nope"), str(tmp_path))
    assert code == 2 and "is not a directory" in err
    code, out, err = cli("compare", "--help")
    assert code == 0 and "--jobs N" in out and "runs/<arm>-seed<k>/" in out


def test_threads_are_divided_between_jobs() -> None:
    cores = len(os.sched_getaffinity(0))
    assert threads_per_job(1) == cores
    assert threads_per_job(2) == max(1, cores // 2)
    assert threads_per_job(10 * cores) == 1


@pytest.mark.parametrize("name", ["compare_warmup.yaml", "compare_alpha.yaml"])
def test_example_studies_plan_nine_valid_runs(name: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import gearshift.tasks  # noqa: F401
    from gearshift.report.study import Study, load_study

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # `base:` paths are relative to the repository root
    study = Study(load_study(f"examples/{name}"), f"examples/{name}")
    planned = study.plan(tmp_path)
    assert len(planned) == 9 and {p.seed for p in planned} == {1, 2, 3}
    assert planned[0].run_dir == tmp_path / "runs" / f"{planned[0].arm}-seed1"
    assert study.reproduce(planned[0], tmp_path).startswith(
        f"gearshift train {study.base_argument(tmp_path)} --set ")
