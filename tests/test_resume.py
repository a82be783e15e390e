"""Exact resume: straight run vs. stop (callback, SIGTERM, SIGKILL) + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import gearshift as gs
from gearshift.checkpoint import step_dir_name


def history(run_dir: Path) -> list[tuple[int, float, float, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [(m["step"], m["loss"], m["lr"], m["grad_norm"]) for m in lines if "loss" in m]


def eval_history(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [(m["step"], m["eval/loss"]) for m in lines if "eval/loss" in m]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_identical_runs(a: Path, b: Path) -> None:
    assert history(a) == history(b)  # loss, LR and grad norm: exactly equal floats
    assert eval_history(a) == eval_history(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bit-identical


class Crash(RuntimeError):
    pass


class CrashAfterCheckpoint(gs.Callback):
    """Dies right after the checkpoint of `step` is written, as a crashing process would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
        if path.name == step_dir_name(self.step):  # committed (later, with checkpoint.async)
            raise Crash(str(trainer.run_dir))


def crash_at(cfg: dict, step: int) -> Path:
    with pytest.raises(Crash) as info:
        gs.train(cfg, callbacks=[CrashAfterCheckpoint(step)])
    return Path(str(info.value))


@pytest.mark.parametrize("crash_step", [9, 23])
def test_resume_in_process_is_exact_mid_epoch(make_config, crash_step: int) -> None:
    # ~712 sequences, micro-batch 16, accumulation 2: 23 steps an epoch (the last window
    # short). Crash mid-epoch (9) and on the epoch boundary (23), resume into epoch two.
    cfg = make_config(training={"max_steps": None, "epochs": 2, "batch_size": 16,
                                "accumulate_grad_batches": 2, "eval_every": 10},
                      checkpoint={"every": 1})
    cfg["checkpoint"]["every"] = 9 if crash_step == 9 else 23
    straight = gs.train(cfg)
    assert straight.step == 46
    run_dir = crash_at(cfg, crash_step)
    resumed = gs.train(cfg, resume=run_dir)
    assert resumed.run_dir == run_dir and resumed.step == straight.step
    assert_identical_runs(straight.run_dir, resumed.run_dir)
    events = [json.loads(x) for x in (resumed.run_dir / "events.jsonl").open()]
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == crash_step
    assert resume["checkpoint"].endswith(f"step-{crash_step:08d}")


def test_resume_skips_corrupt_newest_checkpoint(make_config) -> None:
    cfg = make_config(checkpoint={"every": 2})
    straight = gs.train(cfg)
    run_dir = crash_at(cfg, 6)
    newest = run_dir / "checkpoints" / "step-00000006" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = gs.train(cfg, resume=run_dir)
    events = [json.loads(x) for x in (resumed.run_dir / "events.jsonl").open()]
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["checkpoint"].endswith("step-00000004")
    assert "step-00000006" in resume["skipped_corrupt"][0]
    assert_identical_runs(straight.run_dir, resumed.run_dir)


def cli(*args: str, cwd: Path, **kw: Any) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gearshift", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_checkpoint(runs: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for run in runs.glob("*"):
            if (run / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists():
                return run
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint for step {step} within {timeout}s")


def write_cfg(tmp_path: Path, cfg: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": name}), encoding="utf-8")
    return path


@pytest.mark.slow
def test_cli_sigkill_then_resume_is_bit_identical(make_config, tmp_path: Path) -> None:
    cfg = make_config(training={"max_steps": None, "epochs": 2, "batch_size": 16},
                      checkpoint={"every": 5})
    straight = cli("train", str(write_cfg(tmp_path, cfg, "straight")), cwd=tmp_path)
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    (straight_dir,) = (tmp_path / "runs").glob("straight-*")

    victim = cli("train", str(write_cfg(tmp_path, cfg, "victim")), cwd=tmp_path)
    run = wait_for_checkpoint(tmp_path / "runs", 15, victim)  # mid-epoch (45 steps an epoch)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    resumed = cli("resume", str(run), cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in err and f"run directory: {run}" in out
    assert_identical_runs(straight_dir, run)


@pytest.mark.slow
def test_cli_sigterm_checkpoints_and_says_how_to_resume(make_config, tmp_path: Path) -> None:
    cfg = make_config(training={"max_steps": 400, "batch_size": 4, "eval_every": None},
                      checkpoint={"every": 1000})
    proc = cli("train", str(write_cfg(tmp_path, cfg, "term")), cwd=tmp_path)
    deadline = time.time() + 120
    metrics = None
    while time.time() < deadline:
        found = list((tmp_path / "runs").glob("term-*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert "Resume with: gearshift resume" in err
    run = metrics.parent
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert 3 <= step < 400
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == step
    events = [json.loads(x)["event"] for x in (run / "events.jsonl").open()]
    assert events[-2:] == ["checkpoint", "interrupted"]


def test_resume_auto_picks_the_newest_run_of_the_same_name(make_config) -> None:
    cfg = make_config(training={"max_steps": 8}, checkpoint={"every": 2})
    straight = gs.train(cfg)
    run_dir = crash_at(cfg, 4)
    resumed = gs.train({**cfg, "resume": "auto"})
    assert resumed.run_dir == run_dir
    assert_identical_runs(straight.run_dir, resumed.run_dir)
    fresh = gs.train({**cfg, "name": "other", "resume": "auto"})  # nothing to resume: new run
    assert fresh.run_dir.name.startswith("other-") and fresh.step == 8


def test_second_ctrl_c_aborts_at_once(make_config) -> None:
    class DoubleInterrupt(gs.Callback):
        def on_step_end(self, trainer: gs.Trainer, metrics: dict) -> None:
            if trainer.step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # first: finish the step, then checkpoint
                os.kill(os.getpid(), signal.SIGINT)  # second: abort now, no checkpoint

    cfg = make_config(training={"max_steps": 10}, checkpoint={"every": 2})
    with pytest.raises(KeyboardInterrupt):
        gs.train(cfg, callbacks=[DoubleInterrupt()])
    (run,) = Path(cfg["output_dir"]).iterdir()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_first_ctrl_c_checkpoints_and_raises_interrupted(make_config) -> None:
    class Interrupt(gs.Callback):
        def on_step_end(self, trainer: gs.Trainer, metrics: dict) -> None:
            if trainer.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = make_config(training={"max_steps": 10}, checkpoint={"every": 100})
    with pytest.raises(gs.TrainingInterrupted, match="Resume with: gearshift resume") as info:
        gs.train(cfg, callbacks=[Interrupt()])
    assert info.value.exit_code == 130
    (run,) = Path(cfg["output_dir"]).iterdir()
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000003"]


def test_a_run_killed_before_its_first_checkpoint_says_so(make_config, tmp_path: Path) -> None:
    """The run directory exists (config.yaml) but no checkpoint was ever written."""
    run = tmp_path / "early-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(make_config()))
    with pytest.raises(gs.CheckpointError, match=r"no valid checkpoint in .*checkpoints: the run "
                       r"stopped before its first checkpoint; start it again with `gearshift "
                       r"train .*config.yaml`"):
        gs.train(make_config(), resume=run)
    with pytest.raises(gs.CheckpointError, match=r"is not a run directory with checkpoints"):
        gs.train(make_config(), resume=tmp_path / "nothing-here")
