"""Two CPU processes (gloo) with asynchronous checkpoints: the ranks agree on every commit."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gearshift.checkpoint import CheckpointManager, verify_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_commit_async_checkpoints_together(make_config, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    cfg = make_config(training={"max_steps": 12, "eval_every": None},
                      checkpoint={"every": 3, "keep_last": 10, "async": True})
    cfg["faults"] = {"checkpoint_write_delay_s": 0.05}  # writes overlap several steps
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
         "gearshift", "train", str(config)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = Path(cfg["output_dir"]).iterdir()
    manager = CheckpointManager(run_dir / "checkpoints")
    steps = [p.name for p in manager.list_checkpoints()]
    assert steps == [f"step-{s:08d}" for s in (3, 6, 9, 12)]
    assert all(verify_checkpoint(p) == [] for p in manager.list_checkpoints())
    assert manager.latest() == run_dir / "checkpoints" / "step-00000012"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").open()]
    committed = [e["checkpoint_step"] for e in events if e["event"] == "checkpoint"]
    assert committed == [3, 6, 9, 12]  # logged once (by the main process), in order
