"""SIGKILL the daemon (a real subprocess) while it trains, while it writes a snapshot, between
the snapshot and the switch, and before the move to ``done/``; start it again each time. Every
file is trained exactly once and the final model is bit-identical to an uninterrupted daemon's.
Also: ``daemon start`` / ``stop`` / a second daemon refused / continuing from the checkpoint, and
a run whose checkpoints are all damaged starting again instead of loading one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from gearshift.daemon import DaemonPaths, verify_snapshot
from gearshift.daemon.jobs import all_jobs
from gearshift.daemon.snapshots import current_snapshot
from gearshift.models import validate_model_dir
from test_daemon import adapter_weights, drop, events, init_base, read_json

#: Slow checkpoints (synchronous, 0.1 s per file written) so that a kill lands mid-file.
SLOW = {"checkpoint": {"every": 2, "keep_last": 3, "async": False},
        "faults": {"checkpoint_write_delay_s": 0.1}}


def spawn(paths: DaemonPaths) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = (paths.base / "subprocess.out").open("ab")
    return subprocess.Popen([sys.executable, "-m", "gearshift", "daemon", "run",
                             str(paths.base), "--drain", "--background"],
                            stdout=log, stderr=log, env=env)


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes] | None,
             paths: DaemonPaths, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.02)
    log = paths.log.read_text() if paths.log.exists() else ""
    out = (paths.base / "subprocess.out").read_text() if (
        paths.base / "subprocess.out").exists() else ""
    raise AssertionError(f"never saw: {what}\n--- daemon.log\n{log[-3000:]}\n--- output\n"
                         f"{out[-3000:]}")


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def logged(paths: DaemonPaths, text: str) -> Callable[[], bool]:
    return lambda: paths.log.exists() and text in paths.log.read_text()


def set_delays(paths: DaemonPaths, **delays: float) -> None:
    config = yaml.safe_load(paths.config.read_text())
    config["daemon"]["stage_delay_s"] = delays
    paths.config.write_text(yaml.safe_dump(config))


def assert_current_is_valid(paths: DaemonPaths) -> Path:
    current = current_snapshot(paths)
    assert current is not None and verify_snapshot(current) == []
    assert validate_model_dir(paths.current_model).ok
    return current


def run_of(paths: DaemonPaths, file: str) -> Path:
    runs = [j.run_dir(paths) for j in all_jobs(paths) if j.file == file]
    assert len(runs) == 1, f"{file} has {len(runs)} runs"  # never trained twice
    return runs[0]


def test_sigkill_at_every_stage_loses_nothing_and_repeats_nothing(tmp_path: Path,
                                                                  cli: Any) -> None:
    ref = init_base(tmp_path, cli, "ref", **SLOW)
    chaos = init_base(tmp_path, cli, "chaos", **SLOW)
    for paths in (ref, chaos):
        drop(paths, "x.jsonl", 24, age=20)
        drop(paths, "y.jsonl", 24, age=10, offset=4)
    code, _, err = cli("daemon", "run", str(ref.base), "--drain")
    assert code == 0, err
    initial = current_snapshot(chaos)

    # 1. While training x: right after its step-2 checkpoint is committed.
    proc = spawn(chaos)
    wait_for("x's step-2 checkpoint", lambda: any(
        chaos.runs.glob("*-x/checkpoints/step-00000002")), proc, chaos)
    kill(proc)
    assert [p.name for p in chaos.processing.iterdir()] == ["x.jsonl"]
    assert current_snapshot(chaos) == initial

    # 2. While writing x's snapshot (one file copied, the rest not yet).
    set_delays(chaos, snapshot_file=2.0)
    proc = spawn(chaos)
    wait_for("snapshot of x started", logged(chaos, "stage snapshot_file of x.jsonl"), proc,
             chaos)
    kill(proc)
    assert list(chaos.snapshots.glob(".tmp-*-x")), "the kill should leave a half-written copy"
    assert assert_current_is_valid(chaos) == initial

    # 3. After the switch to x's model, before x moves to done/.
    set_delays(chaos, done=2.0)
    proc = spawn(chaos)
    wait_for("x about to move to done/", logged(chaos, "stage done of x.jsonl"), proc, chaos)
    kill(proc)
    x_snapshot = assert_current_is_valid(chaos)
    assert x_snapshot.name.endswith("-x") and not (chaos.done / "x.jsonl").exists()
    assert (chaos.processing / "x.jsonl").exists()

    # 4. y trained and snapshotted, killed before the switch.
    set_delays(chaos, switch=2.0)
    proc = spawn(chaos)
    wait_for("y about to switch", logged(chaos, "stage switch of y.jsonl"), proc, chaos)
    kill(proc)
    assert assert_current_is_valid(chaos) == x_snapshot
    assert (chaos.done / "x.jsonl").exists() and (chaos.processing / "y.jsonl").exists()

    # 5. Undisturbed to the end.
    set_delays(chaos)
    proc = spawn(chaos)
    assert proc.wait(timeout=120) == 0, (chaos.base / "subprocess.out").read_text()[-3000:]

    for paths in (ref, chaos):
        assert sorted(p.name for p in paths.done.iterdir()) == [
            "x.jsonl", "x.jsonl.result.json", "y.jsonl", "y.jsonl.result.json"]
        assert list(paths.processing.iterdir()) == [] and list(paths.failed.iterdir()) == []
    x_run = run_of(chaos, "x.jsonl")
    assert len(events(x_run, "start")) == 1  # started once ...
    assert len(events(x_run, "resume")) == 1  # ... and resumed from its checkpoint, not redone
    assert events(x_run, "resume")[0]["step"] == 2
    assert len(events(run_of(chaos, "y.jsonl"), "start")) == 1
    assert read_json(chaos.done / "x.jsonl.result.json")["resumes"] == 1
    assert not list(chaos.snapshots.glob(".tmp-*"))
    final, expected = adapter_weights(chaos.current_model), adapter_weights(ref.current_model)
    assert final.keys() == expected.keys() and len(final) > 0
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    assert json.loads((chaos.status).read_text())["files_done"] == 2


def test_start_status_stop_and_continue_from_the_checkpoint(tmp_path: Path, cli: Any) -> None:
    paths = init_base(tmp_path, cli, **SLOW)
    code, out, err = cli("daemon", "start", str(paths.base))
    assert code == 0, err
    pid = int(out.split("pid ")[-1])
    try:
        wait_for("idle", lambda: (read_json(paths.status) if paths.status.exists()
                                  else {}).get("state") == "idle", None, paths, 30)
        code, out, _ = cli("daemon", "status", str(paths.base), "--json")
        status = json.loads(out)
        assert code == 0 and status["pid"] == pid and status["state"] == "idle"
        assert status["queue_length"] == 0 and status["model_kind"] == "full"

        drop(paths, "z.jsonl", 40, age=5)
        wait_for("z's step-2 checkpoint", lambda: any(
            paths.runs.glob("*-z/checkpoints/step-00000002")), None, paths)
        code, _, err = cli("daemon", "run", str(paths.base))
        assert code == 2 and f"pid {pid}" in err and "already running" in err
        status = read_json(paths.status)
        assert status["state"] == "training" and status["current_file"] == "z.jsonl"
        assert status["total_steps"] == 9 and status["system_prompt"].startswith("Current date")
        code, out, err = cli("daemon", "rollback", str(paths.base), "whatever")
        assert code == 2 and f"the daemon is running (pid {pid})" in err

        code, out, err = cli("daemon", "stop", str(paths.base))
        assert code == 0 and "stopped" in out, err
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    assert read_json(paths.status)["state"] == "stopped"
    assert (paths.processing / "z.jsonl").exists() and not list(paths.done.iterdir())
    run_dir = run_of(paths, "z.jsonl")
    stopped_at = events(run_dir, "interrupted")[0]["step"]
    assert 2 <= stopped_at < 9

    code, _, err = cli("daemon", "run", str(paths.base), "--drain")
    assert code == 0, err
    assert events(run_dir, "resume")[0]["step"] == stopped_at
    result = read_json(paths.done / "z.jsonl.result.json")
    assert result["steps"] == 9 and result["resumes"] == 1
    code, out, _ = cli("daemon", "stop", str(paths.base))
    assert code == 0 and "no daemon is running" in out


def test_a_run_whose_checkpoints_are_all_damaged_starts_again(tmp_path: Path,
                                                              cli: Any) -> None:
    paths = init_base(tmp_path, cli, **SLOW)
    drop(paths, "w.jsonl", 24, age=5)
    proc = spawn(paths)
    wait_for("w's step-2 checkpoint", lambda: any(
        paths.runs.glob("*-w/checkpoints/step-00000002")), proc, paths)
    kill(proc)
    run_dir = run_of(paths, "w.jsonl")
    damaged = []
    for weights in (run_dir / "checkpoints").glob("step-*/*.safetensors"):
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        damaged.append(weights)
    assert damaged

    code, _, err = cli("daemon", "run", str(paths.base), "--drain")
    assert code == 0, err
    assert events(run_dir, "resume") == [] and len(events(run_dir, "start")) == 1
    result = read_json(paths.done / "w.jsonl.result.json")
    assert result["steps"] == 6 and result["resumes"] == 0
    assert validate_model_dir(paths.current_model).ok
