"""When does the phase controller move on? Every acceptance scenario, many noise seeds, one table.

For each scenario (a noise-free shape times a noise, see :mod:`gearshift.phases.curves`), each
seed's losses are fed one per optimizer step to three controllers, side by side:

* ``gearshift`` — gearshift's own schema with its defaults (two phases);
* ``trainer schema`` — the LoRA-trainer ``alpha_schedule`` schema as those trainers' defaults
  write it (``loss_improvement_rate_below: 0.001`` as an absolute slope, ``min_steps: 500``,
  window 100), run by gearshift's controller;
* ``trainer rule`` — that trainer's own decision, restated here from its documented behaviour
  for comparison: after ``min_steps`` and 100 losses, a least-squares slope over the last 200
  losses must be ``<= 0.05·τ`` and ``> -5·τ``, and the coefficient of variation of the last 50
  losses ``< 0.5`` (stability is not given here, so not checked; R² is advisory there).

The trainer columns get the synthetic losses times 5 (a loss level of 5), so that their
absolute threshold of 0.001 per step is the same relative rate, 0.02% per step, as gearshift's
default: every scenario then means the same for all three. Recorded losses are fed as they are.

For each it prints the fraction of seeds that moved on (within the deadline, for the scenarios
that must move) and the median step of the first transition. What each scenario expects:

* ``flat`` (CV 0.1, 0.3, 0.5; heavy-tailed log-normal and chi-square with CV 1): move within 3
  windows after ``min_steps``;
* ``fall x5`` (a relative fall of 5 thresholds per step, 3,000 steps): never move;
* ``rise x3`` (a relative rise of 3 thresholds per step): never move;
* ``bend`` (``1 + 5·exp(-s/300)``): move after step 900 (95% of the fall done);
* ``real`` (recorded per-step losses of the default model at batch 1, ``tests/data``): move
  after the steep part.

Usage::

    .venv/bin/python bench/phases.py                 # 50 seeds per scenario, ~3 minutes
    .venv/bin/python bench/phases.py --seeds 200 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gearshift.phases import PhaseScheduler, PhasesConfig
from gearshift.phases.curves import make_curve

DEFAULTS = PhasesConfig.model_validate({"phases": [{"name": "a"}]})
TAU = DEFAULTS.phases[0].exit.relative_improvement_below
WINDOW, MIN_STEPS = DEFAULTS.window, DEFAULTS.phases[0].min_steps
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"

OWN = {"phases": [{"name": "foundation"}, {"name": "emphasis"}]}
TRAINER = {"conv_alpha_phases": {"foundation": {"alpha": 8}, "emphasis": {"alpha": 16}}}
TRAINER_MIN_STEPS, TRAINER_THRESHOLD = 500, 0.001

NOISES = [("gauss", 0.1), ("gauss", 0.3), ("gauss", 0.5), ("lognormal", 1.0), ("chi2", 1.0)]


def scenarios() -> list[dict[str, Any]]:
    """Every scenario: name, expectation, horizon and a ``seed -> losses`` maker."""
    out: list[dict[str, Any]] = []
    for noise, cv in NOISES:
        label = f"{noise} cv {cv:g}"
        out.append({"name": f"flat, {label}", "expect": "move", "n": 3000,
                    "deadline": MIN_STEPS + 3 * WINDOW,
                    "make": _maker("flat", noise, cv)})
    for noise, cv in NOISES:
        out.append({"name": f"fall x5, {noise} cv {cv:g}", "expect": "stay", "n": 3000,
                    "make": _maker("fall", noise, cv, rate=5 * TAU)})
    for cv in (0.05, 0.1):
        out.append({"name": f"rise x3, gauss cv {cv:g}", "expect": "stay", "n": 3000,
                    "make": _maker("rise", "gauss", cv, rate=3 * TAU)})
    for noise, cv in [("gauss", 0.1), ("gauss", 0.3), ("lognormal", 1.0)]:
        out.append({"name": f"bend, {noise} cv {cv:g}", "expect": "after 900", "n": 4000,
                    "make": _maker("bend", noise, cv)})
    for path in sorted(DATA.glob("lm_loss_*.json")):
        out.append({"name": f"real: {path.stem.removeprefix('lm_loss_')}", "expect": "after steep",
                    "n": None, "make": _recorded(path), "seeds": 1})
    return out


def _maker(kind: str, noise: str, cv: float, rate: float = 0.0) -> Callable[[int, int], Any]:
    return lambda seed, n: make_curve(kind, n, noise=noise, cv=cv, seed=seed, rate=rate)


def _recorded(path: Path) -> Callable[[int, int | None], list[float]]:
    return lambda seed, n: json.loads(path.read_text())["losses"]


def gearshift_first(losses: list[float], config: dict[str, Any]) -> int | None:
    sched = PhaseScheduler(config)
    return next((step + 1 for step, y in enumerate(losses) if sched.update(step, y)), None)


def trainer_rule_first(losses: list[float]) -> int | None:
    """That trainer's own transition rule (see the module docstring)."""
    tau, zero = TRAINER_THRESHOLD, 0.05 * TRAINER_THRESHOLD
    y = np.asarray(losses)
    for step in range(max(TRAINER_MIN_STEPS, 100) - 1, len(y)):
        recent = y[max(0, step + 1 - 200):step + 1]
        slope = np.polyfit(np.arange(len(recent)), recent, 1)[0]
        ok = abs(slope) < 5 * tau if slope < 0 else slope <= zero
        last = recent[-50:]
        if ok and np.std(last) / np.mean(last) < 0.5:
            return step + 1
    return None


def run_one(args: tuple[int, int, int | None]) -> tuple[int, tuple[int | None, ...]]:
    index, seed, n = args
    sc = scenarios()[index]
    losses = sc["make"](seed, n)
    level = 1.0 if sc["n"] is None else TRAINER_THRESHOLD / TAU
    scaled = [level * y for y in losses]
    return index, (gearshift_first(losses, OWN), gearshift_first(scaled, TRAINER),
                   trainer_rule_first(scaled))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50, metavar="N",
                        help="noise seeds per synthetic scenario (default: 50)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="worker processes (default: 1)")
    args = parser.parse_args()
    table = scenarios()
    work = [(i, seed, sc["n"]) for i, sc in enumerate(table)
            for seed in range(sc.get("seeds", args.seeds))]
    started = time.perf_counter()
    results: dict[int, list[tuple[int | None, ...]]] = {i: [] for i in range(len(table))}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for index, firsts in pool.map(run_one, work, chunksize=4):
            results[index].append(firsts)
    print(f"gearshift defaults: window {WINDOW}, min_steps {MIN_STEPS}, threshold {TAU:g}/step "
          f"(relative); {args.seeds} seeds per synthetic scenario\n")
    head = (f"{'scenario':<34} {'expect':<12} {'gearshift':>17} {'trainer schema':>17} "
            f"{'trainer rule':>17}")
    print(head)
    print("-" * len(head))
    for i, sc in enumerate(table):
        cells = [_cell(sc, [r[k] for r in results[i]], k > 0) for k in range(3)]
        print(f"{sc['name']:<34} {sc['expect']:<12} {cells[0]:>17} {cells[1]:>17} {cells[2]:>17}")
    print(f"\ncells: moved/seeds (median first transition step); for 'move' scenarios, moved "
          f"means within 3 windows after min_steps ({MIN_STEPS + 3 * WINDOW} steps for "
          f"gearshift, {TRAINER_MIN_STEPS + 3 * 100} for the trainer); "
          f"{time.perf_counter() - started:.0f} s")


def _cell(sc: dict[str, Any], firsts: list[int | None], trainer: bool) -> str:
    deadline = sc.get("deadline")
    if deadline is not None and trainer:
        deadline = TRAINER_MIN_STEPS + 3 * 100
    moved = [f for f in firsts if f is not None and (deadline is None or f <= deadline)]
    median = f"{statistics.median(moved):.0f}" if moved else "-"
    return f"{len(moved)}/{len(firsts)} ({median})"


if __name__ == "__main__":
    main()
