"""The embedded default pipeline (pretrain -> sft -> rl -> qat), end to end through the CLI with
reduced step counts; and examples/pipeline.yaml spelling it out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gearshift.pipeline.default import default_pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_file_is_the_embedded_default() -> None:
    example = yaml.safe_load((ROOT / "examples" / "pipeline.yaml").read_text())
    assert example == default_pipeline()
    assert [s["name"] for s in example["stages"]] == ["pretrain", "sft", "rl", "qat"]
    assert [s.get("from") for s in example["stages"]] == [None, "pretrain", "sft", "rl"]


@pytest.mark.slow
def test_default_pipeline_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sets = ["pretrain.training.max_steps=20", "pretrain.training.eval_every=10",
            "pretrain.checkpoint.every=10",
            "sft.training.max_steps=20", "sft.training.eval_every=10",
            "sft.checkpoint.every=10", "sft.eval.generate.num_samples=8",
            "sft.schedule.warmup_steps=2", "rl.schedule.warmup_steps=1",
            "qat.schedule.warmup_steps=2",
            "rl.training.max_steps=4", "rl.training.eval_every=2", "rl.checkpoint.every=2",
            "rl.eval.generate.num_samples=8",
            "qat.training.max_steps=10", "qat.training.eval_every=5",
            "qat.checkpoint.every=5", "qat.eval.generate.num_samples=8",
            "qat.quantization.ramp.steps=4"]
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "gearshift", "pipeline", "run", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    root = tmp_path / re.search(r"pipeline directory: (\S+)", proc.stdout).group(1)
    assert root.parent == tmp_path / "pipelines" and root.name.startswith("default-")
    status = json.loads((root / "status.json").read_text())
    assert [(s["name"], s["state"], s["steps"]) for s in status["stages"]] == [
        ("pretrain", "finished", 20), ("sft", "finished", 20), ("rl", "finished", 4),
        ("qat", "finished", 10)]
    assert [s["output"]["kind"] for s in status["stages"]] == ["full", "adapter", "full",
                                                                "full"]
    for i, name in ((1, "sft"), (2, "rl"), (3, "qat")):
        handoff = json.loads((root / "handoff" / f"{i}-{name}.json").read_text())
        assert handoff["validation"]["ok"] is True
    final = json.loads((root / "stages" / "3-qat" / "final" / "config.json").read_text())
    assert final["quantization_config"]["quant_method"] == "bitnet"
    summary = (root / "report" / "summary.md").read_text()
    for name in ("pretrain", "sft", "rl", "qat"):
        assert f"| {name} |" in summary
    assert f"final model: {root.relative_to(tmp_path)}/stages/3-qat/final" in proc.stdout
