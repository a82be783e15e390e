"""``checkpoint.async`` in the training loop: exact resume, SIGKILL mid-write, graceful stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import gearshift as gs
from gearshift.checkpoint import CheckpointManager, step_dir_name, verify_checkpoint
from gearshift.cli.main import main


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open()]


def history(run_dir: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["lr"], m["grad_norm"])
            for m in lines(run_dir / "metrics.jsonl") if "loss" in m]


def assert_identical_runs(a: Path, b: Path) -> None:
    assert history(a) == history(b)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def slow_writes(make_config, delay: float, **sections) -> dict:
    cfg = make_config(**sections)
    cfg["faults"] = {"checkpoint_write_delay_s": delay}
    return cfg


class Crash(RuntimeError):
    pass


class CrashWhenCommitted(gs.Callback):
    def __init__(self, step: int) -> None:
        self.step = step
        self.at: int | None = None

    def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
        if path.name == step_dir_name(self.step):
            self.at = trainer.step
            raise Crash(str(trainer.run_dir))


def test_resume_from_an_async_checkpoint_is_bit_exact(make_config) -> None:
    base = dict(training={"max_steps": 12, "eval_every": None}, checkpoint={"every": 3})
    straight = gs.train(make_config(**base))
    # Each file of a checkpoint takes 50 ms to write: training runs on meanwhile.
    cfg = slow_writes(make_config, 0.05, **base)
    crash = CrashWhenCommitted(6)
    with pytest.raises(Crash) as info:
        gs.train(cfg, callbacks=[crash])
    run_dir = Path(str(info.value))
    assert crash.at is not None and crash.at > 6  # committed while later steps trained
    events = lines(run_dir / "events.jsonl")
    snapshot = next(e for e in events if e["event"] == "checkpoint_snapshot"
                    and e["checkpoint_step"] == 6)
    assert snapshot["step"] == 6 and snapshot["blocked_s"] >= 0
    resumed = gs.train(cfg, resume=run_dir)
    assert resumed.step == 12
    assert_identical_runs(straight.run_dir, run_dir)


def test_sigkill_while_the_writer_is_mid_write_keeps_the_previous_checkpoint(
        make_config, tmp_path: Path) -> None:
    base = dict(training={"max_steps": 12, "eval_every": None}, checkpoint={"every": 3})
    reference = gs.train(make_config(**base))
    cfg = slow_writes(make_config, 1.0, **base)
    cfg["output_dir"] = str(tmp_path / "victim")
    config = tmp_path / "victim.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "gearshift", "train", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    state = ""
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list((tmp_path / "victim").glob("tiny-*"))
            if runs:
                ckpts = runs[0] / "checkpoints"
                writing = [p for p in ckpts.glob(".tmp-step-00000006-*") if any(p.iterdir())]
                metrics = runs[0] / "metrics.jsonl"
                trained = max((m["step"] for m in lines(metrics)), default=0) \
                    if metrics.exists() else 0
                state = f"writing={writing}, trained={trained}"
                # Step 3 committed, step 6 half written, and training has gone past step 6.
                if writing and (ckpts / "step-00000003").is_dir() and trained >= 7:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{state}\n{err[-2000:]}"
    (run_dir,) = (tmp_path / "victim").glob("tiny-*")
    manager = CheckpointManager(run_dir / "checkpoints")
    assert manager.list_checkpoints() == [run_dir / "checkpoints" / "step-00000003"]
    assert manager.latest() == run_dir / "checkpoints" / "step-00000003"
    assert verify_checkpoint(manager.latest()) == []
    assert main(["resume", str(run_dir), "--set", "faults.checkpoint_write_delay_s=0"]) == 0
    resume = [e for e in lines(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert Path(resume[-1]["checkpoint"]).name == "step-00000003"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_identical_runs(reference.run_dir, run_dir)


class TermAt(gs.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: gs.Trainer, metrics: dict) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_graceful_stop_waits_for_the_writer(make_config) -> None:
    cfg = slow_writes(make_config, 0.1, training={"max_steps": 20, "eval_every": None},
                      checkpoint={"every": 4})
    with pytest.raises(gs.TrainingInterrupted) as info:
        gs.train(cfg, callbacks=[TermAt(5)])
    assert info.value.exit_code == 128 + signal.SIGTERM
    (run_dir,) = Path(cfg["output_dir"]).iterdir()
    ckpts = run_dir / "checkpoints"
    assert f"checkpoint {ckpts / 'step-00000005'}" in str(info.value)
    manager = CheckpointManager(ckpts)
    assert manager.latest() == ckpts / "step-00000005" and verify_checkpoint(manager.latest()) == []
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # nothing half written
    events = [(e["event"], e.get("checkpoint_step")) for e in lines(run_dir / "events.jsonl")]
    assert events.index(("checkpoint", 5)) < events.index(("interrupted", None))
    # The stop waited for its own checkpoint to be written (and said so in an event).
    assert ("checkpoint_wait", 5) in events


def test_the_end_of_a_run_waits_for_the_writer(make_config) -> None:
    cfg = slow_writes(make_config, 0.1, training={"max_steps": 8, "eval_every": None},
                      checkpoint={"every": 4})
    committed: list[str] = []

    class Record(gs.Callback):
        def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
            committed.append(path.name)

    result = gs.train(cfg, callbacks=[Record()])
    assert result.checkpoint == result.run_dir / "checkpoints" / "step-00000008"
    assert verify_checkpoint(result.checkpoint) == []
    assert committed == ["step-00000004", "step-00000008"]
    events = [e["event"] for e in lines(result.run_dir / "events.jsonl")]
    assert events.index("checkpoint_snapshot") < events.index("checkpoint") < events.index("end")


def test_synchronous_checkpoints_commit_at_their_step(make_config) -> None:
    cfg = make_config(training={"max_steps": 6, "eval_every": None},
                      checkpoint={"every": 3, "async": False})
    steps: list[tuple[int, str]] = []

    class Record(gs.Callback):
        def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
            steps.append((trainer.step, path.name))

    result = gs.train(cfg, callbacks=[Record()])
    assert steps == [(3, "step-00000003"), (6, "step-00000006")]
    assert not any(e["event"] == "checkpoint_snapshot"
                   for e in lines(result.run_dir / "events.jsonl"))


def test_async_is_a_config_key_and_a_flag(cli, tmp_path: Path) -> None:
    code, out, _ = cli("config", "show", "--no-async-checkpoints")
    assert code == 0 and yaml.safe_load(out)["checkpoint"]["async"] is False
    code, out, _ = cli("config", "show")
    assert yaml.safe_load(out)["checkpoint"]["async"] is True
    code, _, err = cli("config", "show", "--set", "checkpoint.asynch=false")
    assert code == 2 and "did you mean 'async'" in err
    code, out, _ = cli("train", "--help")
    assert "--async-checkpoints" in out and "[checkpoint.async]" in out
