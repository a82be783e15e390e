"""A new mode is a new file: a task defined here, registered, trained, killed and resumed.

``ToyRegression`` is a linear regression on a synthetic dataset with a metric of its own (the
mean absolute error), its own config section and its own checkpointed state (JSON and tensors).
It goes through ``gs.train`` like the built-in ``lm`` task: no change to the loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file
from torch import nn

import gearshift as gs
from gearshift.tasks import TASKS, EvalLoop, LossOutput, Task, TaskParts

HERE = Path(__file__).resolve().parent


class ToySection(BaseModel):
    """The task's own config section, ``toy_regression:``."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(512, ge=16)
    features: int = Field(4, ge=1)
    noise: float = Field(0.1, ge=0.0)


class ToyRegression(Task):
    """y = x . w + noise, fitted by a linear layer; judged by its mean absolute error."""

    name = "toy_regression"
    config_section = ToySection

    def __init__(self, config: gs.Config) -> None:
        super().__init__(config)
        self.settings = ToySection.model_validate(config.model_extra.get(self.name) or {})
        self.targets_seen = 0  # JSON state
        self.target_sum = torch.zeros(1, dtype=torch.float64)  # tensor state

    def build(self) -> TaskParts:
        s = self.settings
        gen = torch.Generator().manual_seed(self.config.seed)
        x = torch.randn(s.samples, s.features, generator=gen)
        w = torch.randn(s.features, generator=gen)
        y = x @ w + s.noise * torch.randn(s.samples, generator=gen)
        data = list(zip(x, y, strict=True))
        torch.manual_seed(self.config.seed)
        cut = s.samples // 8
        return TaskParts(nn.Linear(s.features, 1), data[cut:], data[:cut])

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        x, y = batch
        err = model(x).squeeze(-1) - y
        if model.training:
            self.targets_seen += len(y)
            self.target_sum += y.detach().double().sum()
        return LossOutput((err ** 2).sum(), len(y), {"abs_err": err.detach().abs().sum()})

    def evaluate(self, model: nn.Module, eval_data: Sequence[Any], loop: EvalLoop,
                 ) -> dict[str, float]:
        x = torch.stack([s[0] for s in eval_data])
        y = torch.stack([s[1] for s in eval_data])
        err = model(x).squeeze(-1) - y
        return {"eval/loss": float((err ** 2).mean()), "eval/mae": float(err.abs().mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"targets_seen": self.targets_seen}

    def load_state_dict(self, state: Any) -> None:
        self.targets_seen = int(state["targets_seen"])

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {"target_sum": self.target_sum.clone()}

    def load_tensor_state(self, tensors: Any) -> None:
        self.target_sum = tensors["target_sum"].clone()


TASKS[ToyRegression.name] = ToyRegression


class Slow(gs.Callback):
    """Gives the killer time to strike mid-run (changes nothing that is computed)."""

    def on_step_end(self, trainer: gs.Trainer, metrics: dict[str, Any]) -> None:
        time.sleep(0.02)


def toy_config(root: Path, name: str) -> dict[str, Any]:
    return {
        "task": "toy_regression", "name": name, "seed": 3, "output_dir": str(root / name),
        "toy_regression": {"samples": 512, "noise": 0.05},
        "optim": {"learning_rate": 0.05},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 4},
        "training": {"max_steps": 60, "batch_size": 16, "eval_every": 20, "log_every": 1},
        "checkpoint": {"every": 5, "keep_last": 20},
        "logging": {"progress_bar": False, "tensorboard": False},
    }


def train_lines(run_dir: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [(m["step"], m["loss"], m["lr"], m["abs_err"]) for m in rows if "loss" in m]


def eval_lines(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [(m["step"], m["eval/loss"], m["eval/mae"]) for m in rows if "eval/mae" in m]


def run_in_subprocess(config_path: Path) -> subprocess.Popen:
    # The child imports this file, so the task is registered there exactly as here.
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import test_custom_task as t; "
            f"import gearshift as gs; gs.train(json.load(open({str(config_path)!r})), "
            "callbacks=[t.Slow()])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_custom_task_trains_through_gs_train(tmp_path: Path) -> None:
    result = gs.train(toy_config(tmp_path, "toy"))
    assert result.step == 60
    assert result.metrics["eval/loss"] < 0.1 * result.metrics["eval/loss_before"]
    assert 0 < result.metrics["eval/mae"] < 0.5
    rows = train_lines(result.run_dir)
    assert [r[0] for r in rows] == list(range(1, 61))
    assert rows[-1][1] < rows[0][1]  # the loss fell
    assert all(r[3] > 0 for r in rows)  # the task's own per-step metric is logged
    assert [r[0] for r in eval_lines(result.run_dir)] == [0, 20, 40, 60]
    ckpt = result.run_dir / "checkpoints" / "step-00000060"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["task"] == {"targets_seen": 60 * 16}
    assert load_file(ckpt / "task.safetensors")["target_sum"].dtype == torch.float64
    assert (result.run_dir / "final" / "model.safetensors").is_file()


def test_custom_task_survives_sigkill_with_exact_resume(tmp_path: Path) -> None:
    straight = gs.train(toy_config(tmp_path, "straight")).run_dir
    cfg = toy_config(tmp_path, "victim")
    config_path = tmp_path / "victim.json"
    config_path.write_text(json.dumps(cfg))
    proc = run_in_subprocess(config_path)
    runs = Path(cfg["output_dir"])
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline and run_dir is None:
        found = list(runs.glob("*/checkpoints/step-00000020/manifest.json"))
        run_dir = found[0].parents[2] if found else None
        if run_dir is None and proc.poll() is not None:
            pytest.fail(f"the run ended before its step-20 checkpoint: {proc.stderr.read()}")
        time.sleep(0.01)
    assert run_dir is not None, "no step-20 checkpoint in time"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "final").exists()  # it really died mid-run

    resumed = gs.train(cfg, resume=run_dir)
    events = [json.loads(x) for x in (run_dir / "events.jsonl").open()]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert 20 <= resume["step"] < 60
    assert resumed.step == 60
    assert train_lines(run_dir) == train_lines(straight)  # loss, LR and task metric
    assert eval_lines(run_dir) == eval_lines(straight)
    wa = load_file(straight / "final" / "model.safetensors")
    wb = load_file(run_dir / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    last = "checkpoints/step-00000060"
    assert json.loads((run_dir / last / "trainer_state.json").read_text())["task"] == \
        json.loads((straight / last / "trainer_state.json").read_text())["task"]
    assert torch.equal(load_file(run_dir / last / "task.safetensors")["target_sum"],
                       load_file(straight / last / "task.safetensors")["target_sum"])


def test_task_names_and_sections_are_validated_with_the_config(tmp_path: Path) -> None:
    with pytest.raises(gs.ConfigError) as info:
        gs.load_config({"task": "toy_regresion", "toy_regression": {"samples": 2, "nois": 1}})
    paths = {p.path: p.message for p in info.value.problems}
    assert "did you mean 'toy_regression'" in paths["task"] and "lm" in paths["task"]
    assert "toy_regression.samples" in paths and "toy_regression.nois" in paths
    assert gs.load_config({"task": "toy_regression"}).task == "toy_regression"
    assert gs.load_config({}).task == "lm"


def test_unknown_task_on_the_command_line_exits_2_listing_the_tasks(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "gearshift", "train", "--set", "task=nope"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "task" in proc.stderr and "unknown task 'nope'" in proc.stderr
    assert "lm" in proc.stderr and "Traceback" not in proc.stderr
