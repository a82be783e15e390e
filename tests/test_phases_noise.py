"""The phase controller on the losses its users have: noisy, heavy-tailed, real.

Acceptance tests of the plateau rule (:mod:`gearshift.phases.rules`), each over 20 or more noise
seeds with default settings unless named: flat losses transition within 3 windows after
``min_steps``; a steady fall of 5 thresholds per step never transitions; a rise of 3 thresholds
per step never transitions; a fall that flattens transitions after the bend; decisions do not
depend on the scale of the loss; and recorded per-step losses of a real run
(``tests/data/lm_loss_*.json``, batch 1) transition after their steep part.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gearshift.phases import PhaseScheduler, PhasesConfig, build_phase_scheduler
from gearshift.phases.curves import make_curve

DEFAULTS = PhasesConfig.model_validate({"phases": [{"name": "a"}]})
TAU = DEFAULTS.phases[0].exit.relative_improvement_below
WINDOW = DEFAULTS.window
MIN_STEPS = DEFAULTS.phases[0].min_steps
SEEDS = range(20)
NOISES = [("gauss", 0.1), ("gauss", 0.3), ("gauss", 0.5), ("lognormal", 1.0), ("chi2", 1.0)]
DATA = Path(__file__).parent / "data"


def two_phases(**top: Any) -> dict[str, Any]:
    return {**top, "phases": [{"name": "foundation"}, {"name": "emphasis"}]}


def first_transition(losses: list[float], config: dict[str, Any] | None = None) -> int | None:
    """The number of losses after which the controller first moved on, or None."""
    sched = PhaseScheduler(config or two_phases())
    for step, loss in enumerate(losses):
        if sched.update(step, loss):
            return step + 1
    return None


def real_curves() -> dict[str, list[float]]:
    return {p.stem: json.loads(p.read_text())["losses"] for p in sorted(DATA.glob("lm_loss_*"))}


@pytest.mark.slow
@pytest.mark.parametrize(("noise", "cv"), NOISES)
def test_a_flat_noisy_loss_transitions_within_three_windows(noise: str, cv: float) -> None:
    deadline = MIN_STEPS + 3 * WINDOW
    moved = [first_transition(make_curve("flat", deadline, noise=noise, cv=cv, seed=s))
             for s in SEEDS]
    assert all(m is not None for m in moved), f"seeds that stayed: {moved}"
    # Never before a full window and patience: one lucky window does not end a phase.
    assert min(moved) >= WINDOW + DEFAULTS.patience - 1  # type: ignore[type-var]


@pytest.mark.slow
@pytest.mark.parametrize(("noise", "cv"), NOISES)
def test_a_steady_fall_of_five_thresholds_per_step_never_transitions(noise: str,
                                                                      cv: float) -> None:
    for seed in SEEDS:
        losses = make_curve("fall", 3000, noise=noise, cv=cv, seed=seed, rate=5 * TAU)
        assert first_transition(losses) is None, f"seed {seed}"


@pytest.mark.slow
@pytest.mark.parametrize("cv", [0.05, 0.1])
def test_a_rise_of_three_thresholds_per_step_never_transitions(cv: float) -> None:
    for seed in SEEDS:
        sched = PhaseScheduler(two_phases())
        losses = make_curve("rise", 3000, cv=cv, seed=seed, rate=3 * TAU)
        assert not any(sched.update(step, y) for step, y in enumerate(losses)), f"seed {seed}"
    assert "rising_trend" in sched.status()["outcome"]


@pytest.mark.slow
@pytest.mark.parametrize(("noise", "cv"), [("gauss", 0.1), ("gauss", 0.3), ("lognormal", 1.0)])
def test_a_fall_that_flattens_transitions_after_the_bend(noise: str, cv: float) -> None:
    """``1 + 5·exp(-s/300)``: by step 900 (three time constants) 95% of the fall is done."""
    moved = [first_transition(make_curve("bend", 4000, noise=noise, cv=cv, seed=s, scale=300))
             for s in SEEDS]
    assert all(m is not None for m in moved), moved
    assert min(moved) >= 900, moved  # type: ignore[type-var]
    # ... and not long after: the improvement rate crosses the threshold near step 1,300;
    # a noisier loss is judged over longer windows, which see the end of a fall later.
    assert statistics.median(moved) <= 2200, moved  # type: ignore[type-var]


@pytest.mark.slow
def test_every_decision_is_identical_under_any_scale_of_the_loss() -> None:
    phases = {"window": 100, "phases": [{"name": n, "min_steps": 0} for n in "abc"]}
    for seed in range(4):
        losses = make_curve("bend", 2500, noise="lognormal", cv=0.8, seed=seed, scale=200)
        runs = {}
        for c in (0.001, 0.01, 0.3, 1.0, 7.0, 50.0, 1000.0):
            sched = PhaseScheduler(phases)
            moved = [s for s, y in enumerate(losses) if sched.update(s, c * y)]
            runs[c] = (moved, [d["result"] for d in sched.status()["last_decision"]])
        assert len(runs[1.0][0]) == 2, runs[1.0]
        assert all(r == runs[1.0] for r in runs.values()), seed


def test_recorded_losses_of_a_real_run_transition_after_the_steep_part() -> None:
    curves = real_curves()
    assert len(curves) == 3
    for name, losses in curves.items():
        y = np.asarray(losses)
        moved = first_transition(losses)
        assert moved is not None, name
        # The steep part: the first 150 steps take the loss from ~4.4 to ~3.0 nats per byte.
        # After the transition the loss falls by less than 6% over the next 300 steps.
        assert moved >= WINDOW, (name, moved)
        before, after = y[moved - 100:moved].mean(), y[moved:moved + 300].mean()
        assert (before - after) / before < 0.06, (name, moved, before, after)
        # The old default (window 200, threshold 0.001) moved on while the loss still fell
        # steeply: this is the case the current defaults were chosen for.
        old = first_transition(losses, two_phases(
            window=200, phases=[{"name": "a", "exit": {"relative_improvement_below": 0.001}},
                                {"name": "b"}]))
        assert old is not None and old < moved, (name, old, moved)


def test_a_short_window_says_how_many_losses_the_noise_needs() -> None:
    sched = PhaseScheduler(two_phases())
    losses = make_curve("flat", 2000, noise="lognormal", cv=1.0, seed=3)
    for step, y in enumerate(losses[:WINDOW + 20]):
        assert not sched.update(step, y)
    text = sched.explain()
    status = sched.status()
    resolution = next(c for c in status["last_decision"] if c["criterion"] == "resolution")
    assert resolution["result"] == "fail"
    needed = status["statistics"]["needed"]
    assert 500 < needed < 1000  # (12·(1.65·1/(1.5·τ))²)^(1/3) ≈ 710 for CV 1
    assert f"window too short for this noise: need ~{needed} losses" in text
    # The longer fits take over as the phase grows, and the phase then ends.
    for step, y in enumerate(losses[WINDOW + 20:], start=WINDOW + 20):
        if sched.update(step, y):
            break
    assert sched.phase_index == 1
    entry = sched.transition_history[0]
    assert entry["statistics"]["span"] > WINDOW
    assert entry["steps_in_phase"] >= 0.8 * needed


def test_the_level_cv_ignores_per_step_noise_but_not_a_jumping_level() -> None:
    noisy = make_curve("flat", 1200, noise="chi2", cv=1.0, seed=1)
    sched = PhaseScheduler(two_phases())
    assert first_transition(noisy) is not None
    for s, y in enumerate(noisy[:WINDOW]):
        sched.update(s, y)
    assert sched.status()["statistics"]["cv"] < 0.35
    # A level that swings between 0.2 and 1.8 every 60 steps is not a plateau.
    swing = [(0.2 if (s // 60) % 2 else 1.8) * f
             for s, f in enumerate(make_curve("flat", 3000, cv=0.05, seed=2))]
    stuck = PhaseScheduler(two_phases())
    assert not any(stuck.update(s, y) for s, y in enumerate(swing))
    cv = next(c for c in stuck.status()["last_decision"] if c["criterion"] == "cv")
    assert cv["result"] == "fail" and cv["value"] > 0.5


# --------------------------------------------------------------------------- LoRA-trainer schema

#: What that trainer's own default-config writer returns for rank 64 (verbatim).
TRAINER_DEFAULT = {
    "enabled": True, "mode": "phase_adaptive", "linear_alpha": 16,
    "conv_alpha_phases": {
        "foundation": {"alpha": 7, "min_steps": 1000, "exit_criteria": {
            "loss_improvement_rate_below": 0.001, "min_gradient_stability": 0.47,
            "min_loss_r2": 0.005}},
        "balance": {"alpha": 9, "min_steps": 1500, "exit_criteria": {
            "loss_improvement_rate_below": 0.0005, "min_gradient_stability": 0.52,
            "min_loss_r2": 0.003}},
        "emphasis": {"alpha": 14},
    },
    "per_expert": {
        "high_noise": {"phases": {"foundation": {"alpha": 9}, "balance": {"alpha": 11},
                                  "emphasis": {"alpha": 16}}},
        "low_noise": {"phases": {"foundation": {"alpha": 7}, "balance": {"alpha": 9},
                                 "emphasis": {"alpha": 14}}},
    },
}

#: What that trainer's job UI writes with the video preset and every field filled in.
TRAINER_UI_VIDEO = {
    "enabled": True, "_preset": "video",
    "conv_alpha_phases": {
        "foundation": {"alpha": 8, "min_steps": 2000, "exit_criteria": {
            "loss_improvement_rate_below": 0.005, "min_gradient_stability": 0.5,
            "min_loss_r2": 0.01}},
        "balance": {"alpha": 14, "min_steps": 3000, "exit_criteria": {
            "loss_improvement_rate_below": 0.005, "min_gradient_stability": 0.5,
            "min_loss_r2": 0.01}},
        "emphasis": {"alpha": 20, "min_steps": 2000},
    },
}


def test_the_trainers_own_configs_load_unchanged(recwarn: pytest.WarningsRecorder) -> None:
    for raw in (TRAINER_DEFAULT, TRAINER_UI_VIDEO, {**TRAINER_UI_VIDEO, "enabled": False}):
        sched = build_phase_scheduler(json.loads(json.dumps(raw)), rank=64)
        if not raw["enabled"]:
            assert sched is None
            continue
        assert sched is not None and sched.spec.schema == "lora_trainer"
        assert sched.spec.window == 100  # that trainer's own sample requirement
    assert not [w for w in recwarn if "not acted on" in str(w.message)]
    sched = build_phase_scheduler(TRAINER_DEFAULT, rank=64)
    assert sched.get_alpha("blocks.0.high_noise.conv", is_conv=True) == 9
    assert sched.get_alpha("blocks.0.attn.q", is_conv=False) == 16


def test_trainer_keys_with_values_gearshift_does_not_act_on_warn() -> None:
    with pytest.warns(UserWarning, match=r"phases.mode: 'fixed' is not acted on"):
        build_phase_scheduler({**TRAINER_DEFAULT, "mode": "fixed"})
    with pytest.warns(UserWarning, match=r"phases._preset: 'audio' is not acted on"):
        build_phase_scheduler({**TRAINER_UI_VIDEO, "_preset": "audio"})


def test_keys_of_neither_schema_are_still_rejected() -> None:
    from gearshift.phases import validate_phases_config

    problems = {p.path: p.message for p in validate_phases_config(
        {**TRAINER_DEFAULT, "modes": "phase_adaptive", "_presets": "video"})}
    assert set(problems) == {"phases.modes", "phases._presets"}
    assert "did you mean 'mode'" in problems["phases.modes"]
    assert "did you mean '_preset'" in problems["phases._presets"]
    # What the job UI writes when only the preset is chosen has no alphas: a clear error.
    ui_bare = {"enabled": True, "_preset": "video", "conv_alpha_phases": {
        "foundation": {"exit_criteria": {"loss_improvement_rate_below": 0.005}}}}
    problems = {p.path: p.message for p in validate_phases_config(ui_bare)}
    assert "every phase needs its conv LoRA alpha" in problems[
        "phases.conv_alpha_phases.foundation.alpha"]


def test_the_trainers_schema_needs_100_losses_not_a_full_200() -> None:
    cfg = {"conv_alpha_phases": {"a": {"alpha": 8, "min_steps": 0}, "b": {"alpha": 16}}}
    losses = make_curve("flat", 400, cv=0.05, seed=0)
    moved = first_transition(losses, cfg)
    assert moved is not None and 100 <= moved <= 130
