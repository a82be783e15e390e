"""Out-of-memory recovery and the non-finite guard, driven by the documented fault injection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gearshift as gs
from gearshift.train.recovery import is_oom, split_batch


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open()]


def final(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def test_oom_is_recovered_without_losing_a_sample(make_config) -> None:
    base = make_config(training={"max_steps": 6, "batch_size": 8})
    clean = gs.train(base)
    faulty = gs.train(make_config(training={"max_steps": 6, "batch_size": 8},
                                  faults={"oom_when_batch_above": 2}))
    events = [e for e in lines(faulty.run_dir / "events.jsonl") if e["event"] == "oom_recovery"]
    # 8 -> 4 -> 2 on the first step; the reduced size is kept, so no later step fails.
    assert [e["micro_batch"] for e in events] == [4, 2]
    assert all(e["step"] == 0 for e in events)
    assert "injected by faults.oom_when_batch_above=2" in events[0]["error"]
    a, b = final(clean.run_dir), final(faulty.run_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    losses = lambda run: [m["loss"] for m in lines(run / "metrics.jsonl") if "loss" in m]  # noqa: E731
    assert losses(faulty.run_dir) == pytest.approx(losses(clean.run_dir), rel=1e-5)
    state = json.loads((faulty.run_dir / "checkpoints" / "latest" / "trainer_state.json")
                       .read_text())
    assert state["micro_limit"] == 2 and state["samples_seen"] == 6 * 8


def test_a_single_sample_that_does_not_fit_skips_then_stops(make_config) -> None:
    cfg = make_config(training={"max_steps": 5, "batch_size": 2, "eval_every": None},
                      faults={"oom_when_batch_above": 0}, data={"eval_fraction": 0.0},
                      recovery={"max_consecutive_oom_skips": 4})
    with pytest.raises(gs.TrainingDiverged, match="4 steps in a row ran out of memory"):
        gs.train(cfg)
    (run,) = Path(cfg["output_dir"]).iterdir()
    events = lines(run / "events.jsonl")
    assert [e["event"] for e in events].count("oom_skip") == 4
    assert [e["micro_batch"] for e in events if e["event"] == "oom_recovery"] == [1]
    assert not (run / "metrics.jsonl").exists()  # no step was counted


def test_nan_step_is_skipped_and_not_counted(make_config) -> None:
    result = gs.train(make_config(training={"max_steps": 8}, faults={"nan_at_steps": [4]}))
    events = lines(result.run_dir / "events.jsonl")
    skips = [e for e in events if e["event"] == "nonfinite_skip"]
    assert len(skips) == 1 and skips[0]["step"] == 3 and skips[0]["loss"] == "nan"
    train = [m for m in lines(result.run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, 9))  # step 4 was retried, not lost
    from gearshift.schedules import lr_multiplier

    # The schedule did not count the skipped step: step 4's LR is the closed form at 3.
    assert train[3]["lr"] == pytest.approx(3e-3 * lr_multiplier(
        "warmup_cosine", 3, total_steps=8, warmup_steps=3, min_lr_ratio=0.1))


def test_persistent_nan_rolls_back_with_a_lower_lr(make_config) -> None:
    cfg = make_config(training={"max_steps": 10}, checkpoint={"every": 4},
                      faults={"nan_at_steps": [6, 6, 6]},
                      recovery={"max_consecutive_nonfinite": 3, "rollback_lr_factor": 0.5})
    result = gs.train(cfg)
    events = lines(result.run_dir / "events.jsonl")
    rollback = [e for e in events if e["event"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["checkpoint"].endswith("step-00000004")
    assert rollback[0]["lr_factor"] == 0.5
    train = {m["step"]: m for m in lines(result.run_dir / "metrics.jsonl") if "loss" in m}
    assert sorted(train) == list(range(1, 11))
    from gearshift.schedules import lr_multiplier

    expected = 0.5 * 3e-3 * lr_multiplier("warmup_cosine", 5, total_steps=10, warmup_steps=3,
                                          min_lr_ratio=0.1)
    assert train[6]["lr"] == pytest.approx(expected)
    assert result.step == 10


def test_nan_without_checkpoint_stops_with_a_clear_message(make_config) -> None:
    cfg = make_config(training={"max_steps": 10}, checkpoint={"enabled": False},
                      faults={"nan_at_steps": [2, 2, 2]})
    with pytest.raises(gs.TrainingDiverged, match="no checkpoint to roll back to") as info:
        gs.train(cfg)
    assert info.value.exit_code == 3


def test_is_oom_and_split_batch() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom(RuntimeError("shape mismatch"))
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5)}
    parts = split_batch(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p["labels"] for p in parts]), batch["labels"])


def test_rollback_that_keeps_failing_stops(make_config) -> None:
    cfg = make_config(training={"max_steps": 10}, checkpoint={"every": 4},
                      faults={"nan_at_steps": [6] * 9},
                      recovery={"max_consecutive_nonfinite": 3, "max_rollbacks": 2})
    with pytest.raises(gs.TrainingDiverged, match="after 2 rollback"):
        gs.train(cfg)
    (run,) = Path(cfg["output_dir"]).iterdir()
    assert [e["event"] for e in lines(run / "events.jsonl")].count("rollback") == 2


def test_evaluation_that_cannot_fit_one_sample_stops_clearly(make_config) -> None:
    cfg = make_config(training={"max_steps": 5, "batch_size": 2},
                      faults={"oom_when_batch_above": 0})
    with pytest.raises(gs.TrainingDiverged, match="evaluation runs out of memory with one "
                       "sample per forward pass"):
        gs.train(cfg)
