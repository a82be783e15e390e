"""The LR has one owner: base x shape x plateau factor x phase scale x rollback factor.

Each test compares the LR logged at *every* step (``log_every: 1``) with the closed form, then
kills the run at several points (right after a checkpoint, as a crash would), resumes each
time, and compares the resumed run with the uninterrupted one: same LR, same loss, same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import gearshift as gs
from gearshift.checkpoint import step_dir_name
from gearshift.schedules import lr_multiplier

PEAK = 1e-3


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.open()]


def train_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [m for m in lines(run_dir / "metrics.jsonl") if "loss" in m]


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in lines(run_dir / "events.jsonl") if e["event"] == kind]


class Crash(RuntimeError):
    pass


class CrashAt(gs.Callback):
    """Dies right after the checkpoint of ``step`` is written, as a crashing process would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
        if path.name == step_dir_name(self.step):  # committed (later, with checkpoint.async)
            raise Crash(str(trainer.run_dir))


def killed_and_resumed(cfg: dict[str, Any], kill_steps: list[int]) -> Path:
    """Run ``cfg``, killing it after each step in ``kill_steps`` and resuming each time."""
    run_dir: Path | None = None
    # Crash at the checkpoint's own step: events (phase transitions) are not rewound by a
    # resume, and a background save would be announced a few steps later.
    cfg = {**cfg, "checkpoint": {**cfg["checkpoint"], "async": False}}
    for step in kill_steps:
        with pytest.raises(Crash) as info:
            gs.train(cfg, resume=run_dir, callbacks=[CrashAt(step)])
        run_dir = Path(str(info.value))
    result = gs.train(cfg, resume=run_dir)
    assert result.run_dir == run_dir
    resumes = [e["step"] for e in events(result.run_dir, "resume")]
    assert resumes == kill_steps
    return result.run_dir


def assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = train_lines(straight), train_lines(resumed)
    assert [(m["step"], m["lr"], m["loss"]) for m in a] == \
        [(m["step"], m["lr"], m["loss"]) for m in b]
    wa = load_file(straight / "final" / "model.safetensors")
    wb = load_file(resumed / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def phase_scale_at(run_dir: Path, scales: list[float]) -> dict[int, float]:
    """The phase LR scale in force *during* each step (transitions act from the next step)."""
    switched = [e["step"] for e in events(run_dir, "phase_transition")]
    return {m["step"]: scales[sum(1 for t in switched if t < m["step"])]
            for m in train_lines(run_dir)}


def test_first_phase_scale_applies_from_step_one(make_config) -> None:
    phases = {"window": 4, "phases": [
        {"name": "half", "alpha": 8, "lr_scale": 0.5, "min_steps": 4, "max_steps": 5},
        {"name": "full", "alpha": 16}]}
    cfg = make_config(optim={"learning_rate": PEAK},
                      schedule={"name": "constant", "warmup_steps": 0},
                      training={"max_steps": 12, "log_every": 1, "eval_every": 6},
                      checkpoint={"every": 2}, phases=phases)
    straight = gs.train(cfg).run_dir
    logged = train_lines(straight)
    assert [m["step"] for m in logged] == list(range(1, 13))
    assert [e["step"] for e in events(straight, "phase_transition")] == [5]
    assert logged[0]["lr"] == PEAK * 0.5  # step 1 already trains at half the LR
    scale = phase_scale_at(straight, [0.5, 1.0])
    for m in logged:
        assert m["lr"] == pytest.approx(PEAK * scale[m["step"]], rel=1e-12), m["step"]
    assert_same_run(straight, killed_and_resumed(cfg, [2, 6]))


def test_phase_scale_survives_epoch_boundaries(make_config) -> None:
    # ~712 sequences in micro-batches of 32, 4 per step: 6 optimizer steps an epoch.
    phases = {"window": 4, "phases": [
        {"name": "half", "alpha": 8, "lr_scale": 0.5, "min_steps": 4, "max_steps": 8},
        {"name": "quarter", "alpha": 16, "lr_scale": 0.25}]}
    cfg = make_config(optim={"learning_rate": PEAK},
                      schedule={"name": "cosine", "interval": "epoch", "warmup_steps": None,
                                "warmup_epochs": 1},
                      training={"max_steps": None, "epochs": 3, "batch_size": 32,
                                "accumulate_grad_batches": 4, "log_every": 1, "eval_every": 6},
                      checkpoint={"every": 3}, phases=phases)
    straight = gs.train(cfg).run_dir
    (start,) = events(straight, "start")
    per_epoch, total = start["steps_per_epoch"], start["total_steps"]
    assert per_epoch == 6 and total == 18
    logged = train_lines(straight)
    assert [m["step"] for m in logged] == list(range(1, total + 1))
    scale = phase_scale_at(straight, [0.5, 0.25])
    assert set(scale.values()) == {0.5, 0.25}
    for m in logged:
        epoch = (m["step"] - 1) // per_epoch  # the schedule counts finished epochs
        expected = PEAK * lr_multiplier("cosine", epoch, total_steps=3, warmup_steps=1,
                                        min_lr_ratio=0.1) * scale[m["step"]]
        assert m["lr"] == pytest.approx(expected, rel=1e-12), m["step"]
    # The first step of each new epoch keeps the scale (it used to log the unscaled LR).
    unscaled = PEAK * lr_multiplier("cosine", 1, total_steps=3, warmup_steps=1, min_lr_ratio=0.1)
    assert logged[per_epoch]["lr"] == pytest.approx(unscaled * 0.5, rel=1e-12)
    assert_same_run(straight, killed_and_resumed(cfg, [6, 9]))


def test_plateau_reduction_keeps_the_phase_scale(make_config) -> None:
    phases = {"window": 4, "phases": [
        {"name": "half", "alpha": 8, "lr_scale": 0.5, "min_steps": 4, "max_steps": 10},
        {"name": "quarter", "alpha": 16, "lr_scale": 0.25}]}
    # A 50% relative threshold: almost every evaluation counts as a plateau.
    cfg = make_config(optim={"learning_rate": PEAK},
                      schedule={"name": "plateau", "warmup_steps": 2,
                                "options": {"patience": 0, "threshold": 0.5, "factor": 0.5}},
                      training={"max_steps": 16, "log_every": 1, "eval_every": 2},
                      checkpoint={"every": 2}, phases=phases)
    straight = gs.train(cfg).run_dir
    logged = train_lines(straight)
    by_step = {m["step"]: m for m in logged}
    assert sorted(by_step) == list(range(1, 17))
    reduced = events(straight, "lr_reduced")
    assert len(reduced) >= 2
    scale = phase_scale_at(straight, [0.5, 0.25])
    assert any(scale[e["step"]] == 0.5 for e in reduced)  # reduced while the scale is 0.5

    def factor_before(step: int) -> float:  # plateau factor in force during `step`
        return max(0.1, 0.5 ** sum(1 for e in reduced if e["step"] < step))  # min_lr_ratio

    for m in logged:
        expected = PEAK * lr_multiplier("plateau", m["step"] - 1, total_steps=16,
                                        warmup_steps=2) * factor_before(m["step"]) \
            * scale[m["step"]]
        assert m["lr"] == pytest.approx(expected, rel=1e-12), m["step"]
    for e in reduced:  # the event logs the LR in force after the reduction
        if e["step"] < 16:
            assert e["lr"] == by_step[e["step"] + 1]["lr"]
    assert_same_run(straight, killed_and_resumed(cfg, [4, 10]))


def test_rollback_after_nans_keeps_the_phase_scale(make_config) -> None:
    phases = {"window": 4, "phases": [
        {"name": "half", "alpha": 8, "lr_scale": 0.5, "min_steps": 4, "max_steps": 8},
        {"name": "full", "alpha": 16}]}
    cfg = make_config(optim={"learning_rate": PEAK},
                      schedule={"name": "constant", "warmup_steps": 0},
                      training={"max_steps": 12, "log_every": 1, "eval_every": 6},
                      checkpoint={"every": 2}, phases=phases,
                      faults={"nan_at_steps": [6, 6, 6]},
                      recovery={"max_consecutive_nonfinite": 3, "rollback_lr_factor": 0.5})
    straight = gs.train(cfg).run_dir
    (rollback,) = events(straight, "rollback")
    assert rollback["checkpoint"].endswith("step-00000004") and rollback["lr_factor"] == 0.5
    logged = train_lines(straight)
    assert [m["step"] for m in logged] == list(range(1, 13))
    scale = phase_scale_at(straight, [0.5, 1.0])
    assert [e["step"] for e in events(straight, "phase_transition")] == [8]
    for m in logged:
        factor = 0.5 if m["step"] > 4 else 1.0  # steps after the rolled-back-to checkpoint
        assert m["lr"] == pytest.approx(PEAK * scale[m["step"]] * factor, rel=1e-12), m["step"]
    assert_same_run(straight, killed_and_resumed(cfg, [4, 8]))
