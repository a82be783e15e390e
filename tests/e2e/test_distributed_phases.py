"""Two CPU processes (gloo), each fed different data, make the same phase decisions."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_phases_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_transition_on_the_same_step(make_config, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    exit_rule = {"relative_improvement_below": 0.05, "max_cv": 1.0}
    cfg = make_config(
        training={"max_steps": 40, "eval_every": None}, checkpoint={"enabled": False},
        lora={"enabled": True, "r": 4, "alpha": 8},
        phases={"window": 8, "patience": 2, "phases": [
            {"name": "a", "alpha": 8, "min_steps": 8, "exit": exit_rule},
            {"name": "b", "alpha": 16, "min_steps": 8, "exit": exit_rule},
            {"name": "c", "alpha": 32}]})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER),
         str(tmp_path / "cfg.json"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    # Each rank saw different data ...
    assert r0["local_losses"] != r1["local_losses"]
    # ... yet both transitioned on the same steps, by the criteria, with the same alphas.
    assert len(r0["transitions"]) >= 1
    assert r0["transitions"] == r1["transitions"]
    assert all(t["reason"] != "max_steps" for t in r0["transitions"])
    assert r0["alphas"] == r1["alphas"]
    assert len(list((tmp_path / "runs").iterdir())) == 1  # one run directory for both ranks
    assert proc.stdout.count("phase a -> b") + proc.stderr.count("phase a -> b") == 1
