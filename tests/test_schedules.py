"""Tests for gearshift.schedules: closed forms, torch scheduler, HF parity, state, errors."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_polynomial_decay_schedule_with_warmup,
)

from gearshift.errors import CheckpointError, ConfigError, GearshiftError
from gearshift.schedules import (
    ALIASES,
    SCHEDULES,
    GearshiftLR,
    Schedule,
    ScheduleError,
    ScheduleStateError,
    build_lr_scheduler,
    build_schedule,
    lr_multiplier,
    resolve_schedule_name,
    schedule_options,
)

NAMES = list(SCHEDULES)


# --- an independent re-implementation of every closed form, straight from the spec -----------


def reference(
    name: str, s: int, *, T: int, w: int = 0, m: float = 0.0, f: float = 0.0, **kw: Any
) -> float:
    if s < w:
        return f + (1 - f) * s / w
    p = min(max((s - w) / (T - w), 0.0), 1.0)
    if name in ("constant", "plateau"):
        return 1.0
    if name == "linear":
        return m + (1 - m) * (1 - p)
    if name == "warmup_cosine":
        return m if s > T else m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w)))
    if name == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(s, T) / T))
    if name == "cosine_with_restarts":
        n = kw.get("num_cycles", 2)
        return m if p >= 1 else m + (1 - m) * 0.5 * (1 + math.cos(math.pi * ((n * p) % 1)))
    if name == "polynomial":
        return m + (1 - m) * (1 - p) ** kw.get("power", 1.0)
    if name == "exponential":
        return max(m, kw.get("gamma", 0.999) ** (s - w))
    if name == "multistep":
        milestones = kw.get("milestones")
        if milestones is None:
            milestones = sorted({T // 2, 3 * T // 4})
        return max(m, kw.get("gamma", 0.1) ** sum(1 for x in milestones if x <= s))
    if name == "inverse_sqrt":
        tau = kw.get("timescale") or max(w, 1)
        return max(m, 1 / math.sqrt((s - w + tau) / tau))
    if name == "warmup_stable_decay":
        d = max(1, round(kw.get("decay_ratio", 0.1) * T))
        if s < T - d:
            return 1.0
        q = min(max((s - (T - d)) / d, 0.0), 1.0)
        kind = kw.get("decay_type", "linear")
        shaped = {
            "linear": 1 - q,
            "cosine": 0.5 * (1 + math.cos(math.pi * q)),
            "sqrt": 1 - math.sqrt(q),
        }
        return m + (1 - m) * shaped[kind]
    raise AssertionError(name)


# --- hand-computed values -----------------------------------------------------------------------

HAND = [
    # name, common + shape kwargs, step, expected
    ("warmup_cosine", {"total_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1}, 0, 0.0),
    ("warmup_cosine", {"total_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1}, 5, 0.5),
    ("warmup_cosine", {"total_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1}, 10, 1.0),
    ("warmup_cosine", {"total_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1}, 60, 0.55),
    ("warmup_cosine", {"total_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1}, 110, 0.1),
    ("warmup_cosine", {"total_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1}, 200, 0.1),
    ("warmup_cosine", {"total_steps": 110, "warmup_steps": 10, "warmup_start_factor": 0.2}, 5, 0.6),
    ("constant", {"total_steps": 10, "warmup_steps": 4}, 2, 0.5),
    ("constant", {"total_steps": 10, "warmup_steps": 4, "min_lr_ratio": 0.3}, 100, 1.0),
    ("linear", {"total_steps": 10, "min_lr_ratio": 0.5}, 0, 1.0),
    ("linear", {"total_steps": 10, "min_lr_ratio": 0.5}, 5, 0.75),
    ("linear", {"total_steps": 10, "min_lr_ratio": 0.5}, 20, 0.5),
    ("linear", {"total_steps": 12, "warmup_steps": 2}, 7, 0.5),
    ("cosine", {"total_steps": 100, "warmup_steps": 10}, 5, 0.5),
    (
        "cosine",
        {"total_steps": 100, "warmup_steps": 10},
        10,
        0.9755282581475768,
    ),  # not 1: global clock
    ("cosine", {"total_steps": 100, "warmup_steps": 10}, 50, 0.5),
    ("cosine", {"total_steps": 100, "min_lr_ratio": 0.2}, 50, 0.6),
    ("cosine", {"total_steps": 100, "min_lr_ratio": 0.2}, 150, 0.2),
    ("cosine_with_restarts", {"total_steps": 100}, 25, 0.5),
    ("cosine_with_restarts", {"total_steps": 100}, 50, 1.0),
    ("cosine_with_restarts", {"total_steps": 100}, 100, 0.0),
    (
        "cosine_with_restarts",
        {"total_steps": 120, "warmup_steps": 20, "min_lr_ratio": 0.1},
        45,
        0.55,
    ),
    (
        "cosine_with_restarts",
        {"total_steps": 120, "warmup_steps": 20, "min_lr_ratio": 0.1},
        70,
        1.0,
    ),
    ("cosine_with_restarts", {"total_steps": 120, "warmup_steps": 20, "num_cycles": 1}, 70, 0.5),
    ("polynomial", {"total_steps": 10, "power": 2.0}, 5, 0.25),
    ("polynomial", {"total_steps": 10, "power": 2.0, "min_lr_ratio": 0.2}, 5, 0.4),
    ("polynomial", {"total_steps": 4, "power": 0.5}, 3, 0.5),
    ("exponential", {"total_steps": 10, "warmup_steps": 2, "gamma": 0.5}, 2, 1.0),
    ("exponential", {"total_steps": 10, "warmup_steps": 2, "gamma": 0.5}, 5, 0.125),
    (
        "exponential",
        {"total_steps": 10, "warmup_steps": 2, "gamma": 0.5, "min_lr_ratio": 0.2},
        5,
        0.2,
    ),
    ("multistep", {"total_steps": 100}, 49, 1.0),
    ("multistep", {"total_steps": 100}, 50, 0.1),
    ("multistep", {"total_steps": 100}, 75, 0.01),
    ("multistep", {"total_steps": 100, "min_lr_ratio": 0.05}, 75, 0.05),
    ("multistep", {"total_steps": 30, "milestones": [10, 20], "gamma": 0.5}, 20, 0.25),
    ("inverse_sqrt", {"total_steps": 100, "warmup_steps": 4}, 4, 1.0),
    ("inverse_sqrt", {"total_steps": 100, "warmup_steps": 4}, 16, 0.5),
    ("inverse_sqrt", {"total_steps": 100, "warmup_steps": 4}, 40, 1 / math.sqrt(10)),
    ("inverse_sqrt", {"total_steps": 100}, 3, 0.5),
    ("inverse_sqrt", {"total_steps": 100, "warmup_steps": 4, "min_lr_ratio": 0.6}, 16, 0.6),
    ("warmup_stable_decay", {"total_steps": 100, "decay_ratio": 0.2}, 80, 1.0),
    ("warmup_stable_decay", {"total_steps": 100, "decay_ratio": 0.2}, 90, 0.5),
    ("warmup_stable_decay", {"total_steps": 100, "decay_ratio": 0.2}, 150, 0.0),
    (
        "warmup_stable_decay",
        {"total_steps": 100, "decay_ratio": 0.2, "min_lr_ratio": 0.1},
        90,
        0.55,
    ),
    (
        "warmup_stable_decay",
        {"total_steps": 100, "decay_ratio": 0.2, "decay_type": "cosine"},
        85,
        0.8535533905932737,
    ),
    (
        "warmup_stable_decay",
        {"total_steps": 100, "decay_ratio": 0.2, "decay_type": "sqrt"},
        85,
        0.5,
    ),
    ("warmup_stable_decay", {"total_steps": 100, "warmup_steps": 10}, 89, 1.0),
    ("warmup_stable_decay", {"total_steps": 100, "warmup_steps": 10}, 95, 0.5),
    ("plateau", {"total_steps": 100, "warmup_steps": 10}, 5, 0.5),
    ("plateau", {"total_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.5}, 1000, 1.0),
]


@pytest.mark.parametrize(("name", "kwargs", "step", "expected"), HAND)
def test_hand_computed_values(
    name: str, kwargs: dict[str, Any], step: int, expected: float
) -> None:
    assert lr_multiplier(name, step, **kwargs) == pytest.approx(expected, abs=1e-12)


def test_every_schedule_has_hand_values() -> None:
    assert {row[0] for row in HAND} == set(SCHEDULES)


# --- every schedule against the reference, for many parameter combos ---------------------------


@st.composite
def combos(draw: st.DrawFn, name: str) -> dict[str, Any]:
    T = draw(st.integers(1, 150))
    w = draw(st.integers(0, T - 1))
    kw: dict[str, Any] = {
        "total_steps": T,
        "warmup_steps": w,
        "min_lr_ratio": draw(st.floats(0.0, 1.0)),
        "warmup_start_factor": draw(st.floats(0.0, 1.0)),
    }
    if name == "cosine_with_restarts":
        kw["num_cycles"] = draw(st.integers(1, 6))
    elif name == "polynomial":
        kw["power"] = draw(st.floats(0.05, 6.0))
    elif name in ("exponential", "multistep"):
        kw["gamma"] = draw(st.floats(0.01, 1.0))
    if name == "multistep":
        kw["milestones"] = draw(st.none() | st.sets(st.integers(0, T), max_size=4).map(sorted))
    elif name == "inverse_sqrt":
        kw["timescale"] = draw(st.none() | st.integers(1, 50))
    elif name == "warmup_stable_decay":
        kw["decay_ratio"] = draw(st.floats(0.001, 1.0))
        kw["decay_type"] = draw(st.sampled_from(["linear", "cosine", "sqrt"]))
        d = max(1, round(kw["decay_ratio"] * T))
        kw["warmup_steps"] = draw(st.integers(0, T - d))
    return kw


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_matches_reference_step_by_step(name: str, data: st.DataObject) -> None:
    kw = data.draw(combos(name))
    schedule = build_schedule(name, **kw)
    T, w = kw.pop("total_steps"), kw.pop("warmup_steps")
    m, f = kw.pop("min_lr_ratio"), kw.pop("warmup_start_factor")
    for s in range(T + 3):
        want = reference(name, s, T=T, w=w, m=m, f=f, **kw)
        assert math.isclose(schedule.multiplier(s), want, rel_tol=1e-12, abs_tol=1e-12), s


# --- the torch scheduler ----------------------------------------------------------------------

SCHEDULER_CASES = [
    ("constant", {"warmup_steps": 3}),
    ("linear", {"warmup_steps": 3, "min_lr_ratio": 0.1}),
    ("cosine", {"warmup_steps": 3, "min_lr_ratio": 0.1, "warmup_start_factor": 0.1}),
    ("warmup_cosine", {"warmup_steps": 3, "min_lr_ratio": 0.1}),
    ("cosine_with_restarts", {"warmup_steps": 3, "num_cycles": 3}),
    ("polynomial", {"power": 2.0, "min_lr_ratio": 0.05}),
    ("exponential", {"warmup_steps": 2, "gamma": 0.9, "min_lr_ratio": 0.2}),
    ("multistep", {"milestones": [5, 10, 15], "gamma": 0.5}),
    ("inverse_sqrt", {"warmup_steps": 4}),
    ("warmup_stable_decay", {"warmup_steps": 3, "decay_ratio": 0.3, "decay_type": "cosine"}),
    ("plateau", {"warmup_steps": 3}),
]


def two_group_optimizer(kind: str = "sgd") -> torch.optim.Optimizer:
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1},
        {"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 3e-4},
    ]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.1, weight_decay=0.01)


def lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize(("name", "kw"), SCHEDULER_CASES)
def test_scheduler_lr_equals_base_times_multiplier(
    kind: str, name: str, kw: dict[str, Any]
) -> None:
    T = 20
    opt = two_group_optimizer(kind)
    sched = build_lr_scheduler(opt, name, total_steps=T, **kw)
    for k in range(T + 5):
        mult = lr_multiplier(name, k, total_steps=T, **kw)
        assert lrs(opt) == [0.1 * mult, 3e-4 * mult], k
        assert sched.get_last_lr() == lrs(opt)
        opt.step()
        sched.step()


def test_scheduler_has_no_drift_over_long_runs() -> None:
    opt = two_group_optimizer()
    sched = build_lr_scheduler(opt, "exponential", total_steps=10, gamma=0.9999)
    for _ in range(20_000):
        opt.step()
        sched.step()
    assert lrs(opt)[0] == 0.1 * 0.9999**20_000


def test_scheduler_rejects_non_schedule() -> None:
    with pytest.raises(TypeError, match="Schedule"):
        GearshiftLR(two_group_optimizer(), "cosine")  # type: ignore[arg-type]


# --- parity with transformers ------------------------------------------------------------------


def run_pair(ours: GearshiftLR, theirs: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    for s in range(steps + 1):
        assert ours.get_last_lr() == theirs.get_last_lr(), s
        ours.optimizer.step()
        theirs.optimizer.step()
        for sched in (ours, theirs):
            sched.optimizer.step()
            sched.step()


def sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize(
    ("w", "T", "m"), [(0, 50, 0.0), (0, 37, 0.1), (10, 110, 0.1), (7, 8, 0.5), (25, 100, 1.0)]
)
def test_warmup_cosine_matches_transformers(w: int, T: int, m: float) -> None:
    ours = build_lr_scheduler(
        sgd(0.3), "warmup_cosine", total_steps=T, warmup_steps=w, min_lr_ratio=m
    )
    theirs = get_cosine_with_min_lr_schedule_with_warmup(
        sgd(0.3), num_warmup_steps=w, num_training_steps=T, min_lr_rate=m
    )
    run_pair(ours, theirs, T)
    # Past T transformers follows the cosine back up; this schedule holds the floor.
    assert [
        lr_multiplier("warmup_cosine", T + k, total_steps=T, warmup_steps=w, min_lr_ratio=m)
        for k in (1, 50)
    ] == [m, m]


@pytest.mark.parametrize(("w", "T", "n"), [(0, 60, 1), (0, 60, 3), (10, 110, 2), (5, 17, 4)])
def test_cosine_with_restarts_matches_transformers(w: int, T: int, n: int) -> None:
    ours = build_lr_scheduler(
        sgd(), "cosine_with_restarts", total_steps=T, warmup_steps=w, num_cycles=n
    )
    theirs = get_cosine_with_hard_restarts_schedule_with_warmup(
        sgd(), num_warmup_steps=w, num_training_steps=T, num_cycles=n
    )
    run_pair(ours, theirs, T + 10)


@pytest.mark.parametrize(("w", "tau"), [(0, 1), (0, 10), (4, 4), (10, 3), (10, None)])
def test_inverse_sqrt_matches_transformers(w: int, tau: int | None) -> None:
    ours = build_lr_scheduler(sgd(), "inverse_sqrt", total_steps=200, warmup_steps=w, timescale=tau)
    theirs = get_inverse_sqrt_schedule(sgd(), num_warmup_steps=w, timescale=tau)
    run_pair(ours, theirs, 200)


@pytest.mark.parametrize(
    ("w", "T", "m", "power"), [(0, 40, 0.0, 1.0), (5, 40, 0.1, 2.0), (3, 9, 0.5, 0.5)]
)
def test_polynomial_matches_transformers(w: int, T: int, m: float, power: float) -> None:
    ours = build_lr_scheduler(
        sgd(), "polynomial", total_steps=T, warmup_steps=w, min_lr_ratio=m, power=power
    )
    theirs = get_polynomial_decay_schedule_with_warmup(
        sgd(), num_warmup_steps=w, num_training_steps=T, lr_end=m, power=power
    )
    for s in range(T + 5):
        # transformers computes (lr - lr_end) * x + lr_end rather than m + (1 - m) * x.
        assert ours.get_last_lr()[0] == pytest.approx(
            theirs.get_last_lr()[0], rel=1e-12, abs=1e-12
        ), s
        for sched in (ours, theirs):
            sched.optimizer.step()
            sched.step()


# --- state round trip -------------------------------------------------------------------------


def through_json_and_torch(state: dict[str, Any], tmp_path: Any) -> dict[str, Any]:
    state = json.loads(json.dumps(state, allow_nan=False))
    path = tmp_path / "sched.pt"
    torch.save(state, path)
    return torch.load(path, weights_only=True)


def advance(
    sched: GearshiftLR, steps: int, metrics: list[float] | None = None
) -> list[list[float]]:
    seen = []
    for i in range(steps):
        sched.optimizer.step()
        sched.step()
        if metrics is not None:
            sched.report(metrics[i % len(metrics)])
        seen.append(lrs(sched.optimizer))
    return seen


@pytest.mark.parametrize("rebuild", ["load", "from_state_dict"])
@pytest.mark.parametrize(("name", "kw"), SCHEDULER_CASES)
def test_resume_continues_identical_sequence(
    name: str, kw: dict[str, Any], rebuild: str, tmp_path: Any
) -> None:
    T, k = 20, 7
    uninterrupted = build_lr_scheduler(two_group_optimizer("adamw"), name, total_steps=T, **kw)
    want = advance(uninterrupted, T + 5)

    first = build_lr_scheduler(two_group_optimizer("adamw"), name, total_steps=T, **kw)
    advance(first, k)
    state = through_json_and_torch(first.state_dict(), tmp_path)
    assert state["version"] == 1 and state["name"] == name and state["last_epoch"] == k

    opt = two_group_optimizer("adamw")
    if rebuild == "load":
        resumed = build_lr_scheduler(opt, name, total_steps=T, **kw)
        resumed.load_state_dict(state)
    else:
        resumed = GearshiftLR.from_state_dict(opt, state)
    assert lrs(opt) == want[k - 1]  # the optimizer's LR is right before the first resumed step
    assert advance(resumed, T + 5 - k) == want[k:]


# With patience 1 and cooldown 2 these reduce three times, the third time onto the floor.
METRICS = [1.0, 1.0, 1.0, 0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.4, 0.9]


# Cuts land on: one bad report pending (2, 6), mid-cooldown (8), just floored (13).
@pytest.mark.parametrize("cut", [2, 5, 6, 8, 9, 13])
def test_plateau_resume_keeps_counters(cut: int, tmp_path: Any) -> None:
    kw: dict[str, Any] = {"warmup_steps": 1, "min_lr_ratio": 0.2, "patience": 1, "cooldown": 2}
    whole = build_lr_scheduler(two_group_optimizer(), "plateau", total_steps=30, **kw)
    want = advance(whole, 24, METRICS)

    first = build_lr_scheduler(two_group_optimizer(), "plateau", total_steps=30, **kw)
    advance(first, cut, METRICS)
    state = through_json_and_torch(first.state_dict(), tmp_path)
    assert set(state["plateau"]) >= {"best", "num_bad", "cooldown_counter", "current_factor"}

    resumed = GearshiftLR.from_state_dict(two_group_optimizer(), state)
    assert resumed.plateau == first.plateau
    rest = METRICS[cut % len(METRICS) :] + METRICS[: cut % len(METRICS)]
    assert advance(resumed, 24 - cut, rest) == want[cut:]


def test_plateau_state_mid_cooldown_is_explicit(tmp_path: Any) -> None:
    sched = build_lr_scheduler(
        two_group_optimizer(), "plateau", total_steps=30, patience=0, cooldown=3
    )
    assert sched.state_dict()["plateau"]["best"] == "inf"
    assert [sched.report(x) for x in (1.0, 2.0, 2.0)] == [False, True, False]
    state = through_json_and_torch(sched.state_dict(), tmp_path)
    assert state["plateau"] == {
        "best": 1.0,
        "num_bad": 0,
        "cooldown_counter": 2,
        "current_factor": 0.5,
        "num_reductions": 1,
    }
    max_mode = build_lr_scheduler(two_group_optimizer(), "plateau", total_steps=3, mode="max")
    assert json.dumps(max_mode.state_dict(), allow_nan=False)
    assert max_mode.state_dict()["plateau"]["best"] == "-inf"


def test_state_dict_is_not_a_dunder_dict_dump() -> None:
    state = build_lr_scheduler(two_group_optimizer(), "linear", total_steps=5).state_dict()
    assert set(state) == {"version", "name", "params", "last_epoch", "base_lrs", "plateau",
                          "scales"}
    assert state["params"] == {
        "total_steps": 5,
        "warmup_steps": 0,
        "min_lr_ratio": 0.0,
        "warmup_start_factor": 0.0,
    }
    assert state["base_lrs"] == [0.1, 3e-4] and state["plateau"] is None


def test_load_rejects_mismatch_and_names_what_differs() -> None:
    sched = build_lr_scheduler(two_group_optimizer(), "cosine", total_steps=100, warmup_steps=5)
    other = build_lr_scheduler(two_group_optimizer(), "cosine", total_steps=200, warmup_steps=5)
    with pytest.raises(ScheduleStateError, match=r"total_steps: state has 200, scheduler has 100"):
        sched.load_state_dict(other.state_dict())
    linear = build_lr_scheduler(two_group_optimizer(), "linear", total_steps=100)
    with pytest.raises(ValueError, match="'linear'.*'cosine'"):
        sched.load_state_dict(linear.state_dict())
    with pytest.raises(ValueError, match="version 2 is not supported"):
        sched.load_state_dict({**sched.state_dict(), "version": 2})
    with pytest.raises(ValueError, match="no 'version'"):
        sched.load_state_dict({"last_epoch": 3})
    with pytest.raises(ValueError, match="2 base LRs but the optimizer has 1"):
        build_lr_scheduler(sgd(), "cosine", total_steps=100, warmup_steps=5).load_state_dict(
            sched.state_dict()
        )
    assert sched.last_epoch == 0  # rejected states change nothing


def test_load_restores_lr_whatever_the_order(tmp_path: Any) -> None:
    first = build_lr_scheduler(two_group_optimizer(), "linear", total_steps=10)
    advance(first, 4)
    opt_state, sched_state = first.optimizer.state_dict(), first.state_dict()
    opt = two_group_optimizer()
    opt.load_state_dict(opt_state)  # before the scheduler, which torch's own docs warn against
    resumed = build_lr_scheduler(opt, "linear", total_steps=10)
    resumed.load_state_dict(sched_state)
    assert lrs(opt) == lrs(first.optimizer) == [0.1 * 0.6, 3e-4 * 0.6]


def test_from_state_dict_rejects_bad_params() -> None:
    state = build_lr_scheduler(sgd(), "linear", total_steps=10).state_dict()
    state["params"]["total_steps"] = 0
    with pytest.raises(ScheduleStateError, match="total_steps"):
        GearshiftLR.from_state_dict(sgd(), state)
    with pytest.raises(CheckpointError):
        GearshiftLR.from_state_dict(sgd(), {**state, "name": "nope"})


# --- names, options and validation -------------------------------------------------------------


def test_registry_and_aliases() -> None:
    assert NAMES == [
        "constant", "linear", "cosine", "warmup_cosine", "cosine_with_restarts", "polynomial",
        "exponential", "multistep", "inverse_sqrt", "warmup_stable_decay", "plateau",
    ]  # fmt: skip
    assert all(SCHEDULES[n].name == n and issubclass(SCHEDULES[n], Schedule) for n in NAMES)
    for alias, target in ALIASES.items():
        for spelling in (alias, alias.lower(), alias.upper()):
            assert resolve_schedule_name(spelling) == target
    assert resolve_schedule_name("warmupcosine") == "warmup_cosine"
    assert resolve_schedule_name("Warmup_Cosine") == "warmup_cosine"
    assert resolve_schedule_name("ADAPTIVE") == "plateau"


def test_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(ValueError) as err:
        resolve_schedule_name("cosin")
    message = str(err.value)
    assert "did you mean 'cosine'?" in message
    assert all(name in message for name in NAMES) and all(alias in message for alias in ALIASES)
    with pytest.raises(ValueError, match="unknown schedule 'zzz'; valid names") as err2:
        build_lr_scheduler(sgd(), "zzz", total_steps=3)
    assert "did you mean" not in str(err2.value)
    assert isinstance(err2.value, GearshiftError) and isinstance(err2.value, ConfigError)


def test_schedule_options() -> None:
    assert schedule_options("linear") == {}
    assert schedule_options("Adaptive") == {
        "mode": "min", "factor": 0.5, "patience": 2, "threshold": 1e-4,
        "threshold_mode": "rel", "cooldown": 0,
    }  # fmt: skip
    assert schedule_options("MultiStage") == {"milestones": None, "gamma": 0.1}
    assert schedule_options("inverse_sqrt") == {"timescale": None}
    assert schedule_options("cosine_with_restarts") == {"num_cycles": 2}
    assert schedule_options("polynomial") == {"power": 1.0}
    assert schedule_options("exponential") == {"gamma": 0.999}
    assert schedule_options("warmup_stable_decay") == {"decay_ratio": 0.1, "decay_type": "linear"}


BAD_ARGS = [
    ("linear", {"total_steps": 0}, "total_steps", ">= 1"),
    ("linear", {"total_steps": 2.5}, "total_steps", "integer"),
    ("linear", {"total_steps": 10, "warmup_steps": 10}, "warmup_steps", "< total_steps"),
    ("linear", {"total_steps": 10, "warmup_steps": -1}, "warmup_steps", ">= 0"),
    ("linear", {"total_steps": 10, "warmup_steps": True}, "warmup_steps", "integer"),
    ("linear", {"total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio", r"\[0, 1\]"),
    ("linear", {"total_steps": 10, "min_lr_ratio": float("nan")}, "min_lr_ratio", r"\[0, 1\]"),
    (
        "linear",
        {"total_steps": 10, "warmup_start_factor": -0.1},
        "warmup_start_factor",
        r"\[0, 1\]",
    ),
    ("linear", {"total_steps": 10, "power": 2}, "power", "valid options: none"),
    ("cosine", {"total_steps": 10, "num_cycle": 2}, "num_cycle", "valid options: none"),
    (
        "cosine_with_restarts",
        {"total_steps": 10, "num_cycle": 2},
        "num_cycle",
        "valid options: num_cycles",
    ),
    ("cosine_with_restarts", {"total_steps": 10, "num_cycles": 0}, "num_cycles", ">= 1"),
    ("polynomial", {"total_steps": 10, "power": 0}, "power", r"\(0, inf\)"),
    ("exponential", {"total_steps": 10, "gamma": 0.0}, "gamma", r"\(0, 1\]"),
    ("multistep", {"total_steps": 10, "gamma": 1.5}, "gamma", r"\(0, 1\]"),
    ("multistep", {"total_steps": 10, "milestones": [5, 3]}, "milestones", "strictly increasing"),
    ("multistep", {"total_steps": 10, "milestones": [-1, 3]}, "milestones", ">= 0"),
    ("multistep", {"total_steps": 10, "milestones": [3, 11]}, "milestones", "never be reached"),
    ("multistep", {"total_steps": 10, "milestones": "5"}, "milestones", "list of integers"),
    ("inverse_sqrt", {"total_steps": 10, "timescale": 0}, "timescale", ">= 1"),
    ("warmup_stable_decay", {"total_steps": 10, "decay_ratio": 0.0}, "decay_ratio", r"\(0, 1\]"),
    (
        "warmup_stable_decay",
        {"total_steps": 10, "decay_type": "exp"},
        "decay_type",
        "'linear', 'cosine', 'sqrt'",
    ),
    (
        "warmup_stable_decay",
        {"total_steps": 100, "warmup_steps": 50, "decay_ratio": 0.6},
        "decay_ratio",
        "inside the warmup",
    ),
    ("plateau", {"total_steps": 10, "factor": 1.0}, "factor", r"\(0, 1\)"),
    ("plateau", {"total_steps": 10, "mode": "avg"}, "mode", "'min', 'max'"),
    ("plateau", {"total_steps": 10, "patience": -1}, "patience", ">= 0"),
    ("plateau", {"total_steps": 10, "threshold_mode": "x"}, "threshold_mode", "'rel', 'abs'"),
    ("plateau", {"total_steps": 10, "cooldown": 1.5}, "cooldown", "integer"),
]


@pytest.mark.parametrize(("name", "kwargs", "arg", "allowed"), BAD_ARGS)
def test_invalid_arguments_name_the_argument(
    name: str, kwargs: dict[str, Any], arg: str, allowed: str
) -> None:
    with pytest.raises(ValueError, match=rf"(?s){arg}: .*{allowed}") as err:
        build_schedule(name, **kwargs)
    assert [p.path for p in err.value.problems] == [arg]
    with pytest.raises(ValueError):
        lr_multiplier(name, 0, **kwargs)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ScheduleError) as err:
        build_schedule("plateau", total_steps=10, warmup_steps=20, factor=2.0, bogus=1)
    assert sorted(p.path for p in err.value.problems) == ["bogus", "factor", "warmup_steps"]
    assert "3 problems" in str(err.value)


def test_negative_step_raises_and_schedules_are_frozen() -> None:
    schedule = build_schedule("linear", total_steps=10)
    with pytest.raises(ValueError, match="step: must be an integer >= 0"):
        schedule.multiplier(-1)
    with pytest.raises(AttributeError):
        schedule.total_steps = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        Schedule(total_steps=3)


def test_numpy_like_values_are_normalised() -> None:
    schedule = build_schedule(
        "polynomial", total_steps=torch.tensor(10).item(), power=2, min_lr_ratio=0
    )
    assert schedule.params() == {
        "total_steps": 10, "warmup_steps": 0, "min_lr_ratio": 0.0, "warmup_start_factor": 0.0, "power": 2.0,
    }  # fmt: skip
    assert isinstance(schedule.params()["power"], float)
    assert build_schedule("multistep", total_steps=1).milestones == (0,)  # default deduplicated


# --- plateau behaviour ------------------------------------------------------------------------


def plateau(**kw: Any) -> GearshiftLR:
    return build_lr_scheduler(sgd(1.0), "plateau", **{"total_steps": 100, **kw})


def test_plateau_warmup_then_reductions_after_patience() -> None:
    sched = plateau(warmup_steps=2, patience=2, factor=0.5)
    assert sched.report(1.0) is False  # in warmup: ignored
    assert sched.plateau is not None and sched.plateau.best == math.inf
    advance(sched, 1)
    assert lrs(sched.optimizer) == [0.5]
    assert [sched.report(5.0) for _ in range(5)] == [False] * 5  # still warmup at step 1
    advance(sched, 1)
    assert lrs(sched.optimizer) == [1.0]
    # First report sets best; the third bad one (> patience=2) reduces immediately.
    assert [sched.report(1.0) for _ in range(4)] == [False, False, False, True]
    assert lrs(sched.optimizer) == [0.5] and sched.get_last_lr() == [0.5]
    advance(sched, 3)
    assert lrs(sched.optimizer) == [0.5]  # the factor survives step()
    assert [sched.report(0.5) for _ in range(4)] == [False, False, False, True]
    assert lrs(sched.optimizer) == [0.25]


def test_plateau_floor_and_nan() -> None:
    sched = plateau(patience=0, factor=0.1, min_lr_ratio=0.05)
    assert [sched.report(1.0) for _ in range(4)] == [False, True, True, False]
    assert lrs(sched.optimizer) == [0.05]
    state = sched.state_dict()["plateau"]
    assert sched.report(float("nan")) is False
    assert sched.state_dict()["plateau"] == state


def test_plateau_cooldown_ignores_bad_reports() -> None:
    sched = plateau(patience=0, cooldown=2)
    assert [sched.report(1.0) for _ in range(2)] == [False, True]
    # Two cooldown reports are not counted, then one bad report exceeds patience 0.
    assert [sched.report(1.0) for _ in range(3)] == [False, False, True]
    assert lrs(sched.optimizer) == [0.25]


def test_plateau_mode_max_and_thresholds() -> None:
    sched = plateau(mode="max", patience=1)
    assert [sched.report(x) for x in (0.5, 0.6, 0.6, 0.7, 0.65, 0.69)] == [False] * 5 + [True]
    abs_sched = plateau(patience=0, threshold=0.1, threshold_mode="abs")
    assert [abs_sched.report(x) for x in (1.0, 0.95)] == [False, True]  # 0.05 < threshold
    rel_sched = plateau(patience=0, threshold=0.1)
    assert [rel_sched.report(x) for x in (1.0, 0.89)] == [False, False]  # 11% better


def test_report_on_clock_schedule_raises() -> None:
    sched = build_lr_scheduler(sgd(), "cosine", total_steps=10)
    with pytest.raises(ValueError, match="report\\(\\) needs the 'plateau' schedule.*'cosine'"):
        sched.report(1.0)


def test_tensor_learning_rates() -> None:
    opt = torch.optim.AdamW(
        [torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.01), foreach=False
    )
    sched = build_lr_scheduler(opt, "linear", total_steps=4)
    advance(sched, 1)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.0075)
    assert json.dumps(sched.state_dict(), allow_nan=False)
