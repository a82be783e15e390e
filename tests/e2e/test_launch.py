"""`gearshift launch`: one machine with two processes, two localhost "machines" of one process
each, and one process with the same global batch all train the same model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gearshift.schedules import lr_multiplier

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gearshift(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gearshift", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err


def steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [r for r in rows if "loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_two_machines_and_one_process_agree(make_config, tmp_path: Path) -> None:
    cfg = make_config(training={"max_steps": 5, "batch_size": 8, "eval_every": None,
                                "log_every": 1, "grad_clip": None},
                      schedule={"name": "warmup_cosine", "warmup_steps": 2},
                      checkpoint={"enabled": False}, report={"enabled": False})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    port = free_port()
    one = gearshift("train", str(config), "--batch-size", "16", "--run-dir", "one", cwd=tmp_path)
    two = gearshift("launch", "--num_processes", "2", "--main_process_port", str(free_port()),
                    "--", "train", str(config), "--run-dir", "two", cwd=tmp_path)
    finish(one, two)
    machines = [gearshift("launch", "--num_processes", "2", "--num_machines", "2",
                          "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                          "--main_process_port", str(port), "--", "train", str(config),
                          "--run-dir", "machines", cwd=tmp_path) for rank in (0, 1)]
    finish(*machines)

    one_steps, two_steps = steps(tmp_path / "one"), steps(tmp_path / "two")
    machine_steps = steps(tmp_path / "machines")
    assert [r["step"] for r in two_steps] == [1, 2, 3, 4, 5]
    # Two machines of one process each are the same job as one machine with two processes.
    assert [r["loss"] for r in machine_steps] == pytest.approx(
        [r["loss"] for r in two_steps], rel=1e-6)
    # The schedule is stepped once per optimizer step, not once per process.
    expected = [3e-3 * lr_multiplier("warmup_cosine", s - 1, total_steps=5, warmup_steps=2,
                                      min_lr_ratio=0.1) for s in range(1, 6)]
    for run in (one_steps, two_steps, machine_steps):
        assert [r["lr"] for r in run] == pytest.approx(expected, rel=1e-9)
    # One process with the same global batch (16 = 2 x 8) sees the same samples per step:
    # same losses and same weights, to float tolerance (the reduction order differs).
    assert [r["loss"] for r in two_steps] == pytest.approx([r["loss"] for r in one_steps],
                                                           rel=1e-4)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)
    moved = max(float((w1[n] - weights(tmp_path / "machines")[n]).abs().max()) for n in w1)
    assert moved < 1e-4
    # The two-process run counted the samples of both processes.
    assert two_steps[-1]["step"] == 5
    # One writer: a single run directory with one final model, for both layouts.
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "config.yaml").exists()) == \
        ["machines", "one", "two"]


def test_launch_rejects_bad_arguments_before_starting_processes(cli, tmp_path: Path) -> None:
    code, _, err = cli("launch", "--num_processes", "2", "train", "x.yaml")
    assert code == 2 and "needs -- before the verb" in err
    code, _, err = cli("launch", "--num_processes", "2", "--", "report", "x")
    assert code == 2 and "runs one of train, resume after --, got 'report'" in err
    code, _, err = cli("launch", "--no_such_option", "--", "train")
    assert code == 2 and "accelerate launch does not know --no_such_option" in err
    code, _, err = cli("launch", "--num_machines", "2", "--", "train")
    assert code == 2 and "needs --main_process_ip" in err
    code, _, err = cli("launch", "--num_processes", "2", "--", "train", str(tmp_path / "no.yaml"))
    assert code == 2 and "config file not found" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed: {strategy: zero}\n", encoding="utf-8")
    code, _, err = cli("launch", "--num_processes", "2", "--", "train", str(bad))
    assert code == 2 and "distributed.strategy" in err
    code, out, _ = cli("launch", "--help")
    assert code == 0 and "--num_machines" in out and "-- train" in out
