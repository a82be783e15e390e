"""A run checkpointed by N processes resumes with M != N: no training sample is skipped or seen
twice in the epoch, and the LR and the phase controller continue where they were."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gearshift.checkpoint import read_trainer_state
from gearshift.schedules import lr_multiplier

WORKER = Path(__file__).with_name("resize_worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SEED, BATCH, STOP, TOTAL = 7, 8, 3, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def segment(processes: int, tmp_path: Path, tag: str, stop_at: int, resume: bool) -> list[dict]:
    """Run the worker in ``processes`` processes; every step's record, ranks merged."""
    args = [str(WORKER), str(tmp_path / "cfg.json"), str(tmp_path / "run"),
            str(tmp_path / tag), str(stop_at), *(["resume"] if resume else [])]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        assert torchrun is not None
        command = [torchrun, "--nproc_per_node", str(processes), "--master_port",
                   str(free_port()), *args]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{tag}-rank{r}.json").read_text())
             for r in range(processes)]
    steps = []
    for per_rank in zip(*ranks, strict=True):
        first = per_rank[0]
        assert all(r["lr"] == first["lr"] and r["phase"] == first["phase"] for r in per_rank)
        steps.append({**first, "ids": [i for r in per_rank for i in r["ids"]]})
    return steps


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_number_of_processes(make_config, tmp_path: Path, before: int,
                                               after: int) -> None:
    exit_rule = {"relative_improvement_below": 0.5, "max_cv": 5.0}
    cfg = make_config(training={"max_steps": TOTAL, "batch_size": BATCH, "eval_every": None,
                                "log_every": 1},
                      schedule={"name": "warmup_cosine", "warmup_steps": 2},
                      checkpoint={"every": 100, "keep_last": 3},
                      lora={"enabled": True, "r": 4, "alpha": 8},
                      phases={"window": 3, "patience": 1, "phases": [
                          {"name": "a", "alpha": 8, "min_steps": 2, "max_steps": 5,
                           "exit": exit_rule},
                          {"name": "b", "alpha": 16}]})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    first = segment(before, tmp_path, "first", STOP, resume=False)
    saved = read_trainer_state(tmp_path / "run" / "checkpoints" / "latest")
    assert saved["step"] == STOP
    assert saved["position"]["sample"] == STOP * BATCH * before  # global, in samples
    second = segment(after, tmp_path, "second", 0, resume=True)
    steps = first + second
    assert [s["step"] for s in steps] == list(range(1, TOTAL + 1))
    assert [s["world"] for s in steps] == [before] * STOP + [after] * (TOTAL - STOP)

    # Sample-exact: the epoch's order, consumed without a gap or a repeat across the change.
    ids = [i for s in steps for i in s["ids"]]
    assert len(ids) == len(set(ids))
    assert [len(s["ids"]) for s in steps] == \
        [BATCH * before] * STOP + [BATCH * after] * (TOTAL - STOP)
    from gearshift.config import load_config
    from gearshift.tasks import TASKS

    n = len(TASKS["lm"](load_config(cfg)).build().train_data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).tolist()
    assert ids == order[: len(ids)]

    # The LR is the closed form of the optimizer step on both sides of the change.
    expected = [3e-3 * lr_multiplier("warmup_cosine", s - 1, total_steps=TOTAL, warmup_steps=2,
                                     min_lr_ratio=0.1) for s in range(1, TOTAL + 1)]
    assert [s["lr"] for s in steps] == pytest.approx(expected, rel=1e-9)
    # The phase controller goes on counting where it stopped (or moves on by its rules).
    for prev, cur in zip(steps, steps[1:], strict=False):
        assert cur["in_phase"] == prev["in_phase"] + 1 or cur["phase"] != prev["phase"]
    assert steps[-1]["phase"] == "b"  # phase a ends by max_steps 5 at the latest
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").open()]
    assert [e["event"] for e in events].count("resume") == 1
