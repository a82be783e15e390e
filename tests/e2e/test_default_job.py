"""The embedded default job, end to end through the CLI, with a reduced step count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gearshift", "train", "--max-steps", "40", "--checkpoint-every",
         "20", "--set", "training.eval_every=20"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    run_dir = tmp_path / re.search(r"run directory: (\S+)", out).group(1)
    before, after = map(float, re.search(r"eval loss: ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before - 1.0  # it clearly learns, even in 40 steps
    assert f"tensorboard --logdir {run_dir.relative_to(tmp_path) / 'tensorboard'}" in out

    # The run directory as documented.
    names = {p.name for p in run_dir.iterdir()}
    assert names >= {"config.yaml", "overrides.json", "metrics.jsonl", "events.jsonl",
                     "tensorboard", "checkpoints", "final"}
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 40
    assert resolved["data"]["source"] == "pydoc_topics"
    audit = json.loads((run_dir / "overrides.json").read_text())
    assert audit["training.max_steps"]["source"] == "flag --max-steps"
    assert audit["training.eval_every"]["source"] == "--set training.eval_every=20"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000020", "step-00000040"]
    assert os.readlink(run_dir / "checkpoints" / "latest") == "step-00000040"
    forbidden = [p for p in run_dir.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pth")]
    assert forbidden == []

    # final/ loads with plain transformers and computes the same loss the run reported.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = torch.tensor([tok("The with statement")["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < before
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    assert [m["step"] for m in evals if "eval/loss" in m] == [0, 20, 40]
