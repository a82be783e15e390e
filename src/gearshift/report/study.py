"""A study: arms × seeds run as normal runs under ``compare/<name>-<time>/``, then compared.

The study file (``gearshift compare ARMS.yaml``)::

    name: warmup-study
    base: examples/default.yaml        # a config path or an inline config
    seeds: [1, 2, 3]
    arms:
      - {name: control, set: {schedule.name: constant, optim.learning_rate: 0.02}}
      - {name: warmup,  set: {schedule.name: warmup_cosine, schedule.warmup_ratio: 0.1}}
    control: control
    metric: eval/loss                  # lower is better unless `maximize: true`

Each run is ``gearshift train BASE --set KEY=VALUE … --set seed=K --run-dir
compare/<name>-<time>/runs/<arm>-seed<K>`` in a process of its own, so the same seed gives the
same data, data order and initial weights in every arm. Rerunning the same study continues the
newest folder made from the same plan: finished (and diverged) runs are skipped, interrupted
ones resume from their checkpoints.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gearshift import rundir
from gearshift.config import build_layers, read_config_file, resolve
from gearshift.errors import ConfigError, Problem, UsageError
from gearshift.report.compare import COLLAPSE_TOLERANCE, Comparison, compare_runs

RUNS_DIR = "runs"
LOGS_DIR = "logs"
PLAN_FILE = "plan.json"
BASE_FILE = "base.yaml"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
#: Exit code of ``gearshift train`` when the NaN / out-of-memory guard stopped the run.
DIVERGED_EXIT = 3


class ArmSpec(BaseModel):
    """One arm: a name and the config keys it sets (dotted keys, applied after the base)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    set: dict[str, Any] = Field(default_factory=dict)


class StudySpec(BaseModel):
    """The study file: base config, seeds, arms, control arm and the metric compared."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    base: str | dict[str, Any] | None = Field(
        None, description="a config path, an inline config, or null for the embedded default")
    seeds: list[int] = Field(min_length=1)
    arms: list[ArmSpec] = Field(min_length=1)
    control: str
    metric: str = "eval/loss"
    maximize: bool = False
    collapse_tolerance: float = Field(COLLAPSE_TOLERANCE, ge=0)
    set: dict[str, Any] = Field(default_factory=dict,
                                description="keys set in every arm, before the arm's own")
    output_dir: str = Field("compare", description="parent of study folders")


@dataclass(frozen=True)
class PlannedRun:
    """One arm × seed: its run directory, its log file and the ``gearshift`` arguments."""

    arm: str
    seed: int
    run_dir: Path
    log: Path
    overrides: tuple[tuple[str, Any], ...]
    config: dict[str, Any]

    def sets(self) -> list[str]:
        """``KEY=VALUE`` for ``--set`` (values written as YAML)."""
        return [f"{k}={_yaml_value(v)}" for k, v in self.overrides]


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(
        "\n...").strip()


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file, reporting every problem at once.

    Raises:
        ConfigError: Naming each bad key of the study file.
    """
    raw = read_config_file(path)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([Problem(".".join(str(p) for p in e["loc"]), e["msg"])
                           for e in exc.errors()], str(path)) from None
    problems = []
    names = [a.name for a in spec.arms]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(Problem("arms", f"arm name {name!r} is used twice; names must differ"))
    if spec.control not in names:
        problems.append(Problem("control", f"{spec.control!r} is not an arm; arms: "
                                           f"{', '.join(names)}"))
    if len(set(spec.seeds)) != len(spec.seeds):
        problems.append(Problem("seeds", f"seeds repeat: {spec.seeds}; each seed once"))
    if problems:
        raise ConfigError(problems, str(path))
    return spec


class Study:
    """The runs of a study and the comparison of them.

    Args:
        spec: The validated study file.
        study_file: Where the study file is (a relative ``base`` path is looked up from the
            current directory, then beside the study file).
    """

    def __init__(self, spec: StudySpec, study_file: str | Path) -> None:
        self.spec = spec
        self.study_file = Path(study_file)
        self.base_path = self._base_path()

    def _base_path(self) -> Path | None:
        base = self.spec.base
        if not isinstance(base, str):
            return None
        for candidate in (Path(base), self.study_file.parent / base):
            if candidate.is_file():
                return candidate
        raise ConfigError([Problem("base", f"config file not found: {base} (looked in the "
                                           f"current directory and in {self.study_file.parent})")],
                          str(self.study_file))

    def base_values(self) -> dict[str, Any] | None:
        """The base config as a dict (None: the embedded default)."""
        if self.base_path is not None:
            return read_config_file(self.base_path)
        return dict(self.spec.base) if isinstance(self.spec.base, Mapping) else None

    def plan(self, root: Path) -> list[PlannedRun]:
        """Every arm × seed, each config resolved and validated; every problem of every arm is
        reported at once, before anything runs.

        Raises:
            ConfigError: Listing each arm's problems, prefixed with the arm's name.
        """
        base = self.base_values()
        planned, problems = [], []
        for arm in self.spec.arms:
            for seed in self.spec.seeds:
                overrides = (*self.spec.set.items(), *arm.set.items(), ("seed", seed))
                try:
                    resolved = resolve(build_layers(base, dict(overrides)))
                except ConfigError as exc:
                    if seed == self.spec.seeds[0]:  # the same problems for every seed
                        problems.extend(Problem(f"arm {arm.name}" + (f": {p.path}" if p.path
                                                                     else ""), p.message)
                                        for p in exc.problems)
                    continue
                name = f"{arm.name}-seed{seed}"
                planned.append(PlannedRun(arm.name, seed, root / RUNS_DIR / name,
                                          root / LOGS_DIR / f"{name}.log", tuple(overrides),
                                          resolved.config.model_dump(mode="json")))
        if problems:
            raise ConfigError(problems, str(self.study_file))
        return planned

    def folder(self, *, new: bool = False) -> Path:
        """The study's folder: the newest ``<output_dir>/<name>-*`` made from the same plan
        (so rerunning continues it), else a new ``<name>-<YYYYmmdd-HHMMSS>``."""
        parent = Path(self.spec.output_dir)
        wanted = self._plan_record(self.plan(Path("ROOT")))
        if not new and parent.is_dir():
            for old in sorted(parent.glob(f"{self.spec.name}-*"),
                              key=lambda p: p.stat().st_mtime, reverse=True):
                try:
                    saved = json.loads((old / PLAN_FILE).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if saved == wanted:
                    return old
        root = rundir.create_run_dir(parent, self.spec.name)
        (root / PLAN_FILE).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        if self.base_path is None and self.spec.base is not None:
            (root / BASE_FILE).write_text(yaml.safe_dump(dict(self.spec.base), sort_keys=False),
                                          encoding="utf-8")
        return root

    def _plan_record(self, planned: list[PlannedRun]) -> dict[str, Any]:
        return {"study": self.spec.model_dump(mode="json"),
                "runs": {f"{p.arm}-seed{p.seed}": p.config for p in planned}}

    def base_argument(self, root: Path) -> str | None:
        """CONFIG for ``gearshift train``: the base file, the inline base saved in the study
        folder, or None for the embedded default."""
        if self.base_path is not None:
            return str(self.base_path)
        return str(root / BASE_FILE) if self.spec.base is not None else None

    def reproduce(self, run: PlannedRun, root: Path) -> str:
        """The command that trains ``run`` again on its own."""
        base = self.base_argument(root)
        words = ["gearshift", "train", *([base] if base else [])]
        for item in run.sets():
            words += ["--set", item]
        return shlex.join(words)

    def compare(self, root: Path, planned: list[PlannedRun]) -> Comparison:
        """Compare the runs of the study (whatever state they are in) and write the report."""
        by_arm: dict[str, list[Path]] = {}
        for run in planned:
            if rundir.RunPaths(run.run_dir).metrics.is_file():
                by_arm.setdefault(run.arm, []).append(run.run_dir)
        missing = [a.name for a in self.spec.arms if a.name not in by_arm]
        if missing:
            raise UsageError(f"arm(s) {', '.join(missing)} have no run with metrics yet; see "
                             f"the logs in {root / LOGS_DIR}")
        comparison = compare_runs(by_arm, metric=self.spec.metric, control=self.spec.control,
                                  maximize=self.spec.maximize,
                                  collapse_tolerance=self.spec.collapse_tolerance)
        comparison.commands = {arm: [self.reproduce(r, root) for r in planned if r.arm == arm]
                               for arm in by_arm}
        comparison.write(root / rundir.REPORT_DIR)
        return comparison


def run_action(run: PlannedRun) -> str:
    """What a run needs: ``skip`` (finished or diverged), ``resume`` (it has a checkpoint) or
    ``start`` (nothing, or nothing worth keeping)."""
    if rundir.RunPaths(run.run_dir).events.is_file():
        state = rundir.run_status(run.run_dir).state
        if state in ("finished", "diverged"):
            return "skip"
    if rundir.latest_checkpoint(run.run_dir) is not None:
        return "resume"
    return "start"


def child_command(study: Study, run: PlannedRun, root: Path, action: str) -> list[str]:
    """The ``python -m gearshift …`` command line of one run."""
    cmd = [sys.executable, "-m", "gearshift"]
    if action == "resume":
        return [*cmd, "resume", str(run.run_dir)]
    base = study.base_argument(root)
    cmd += ["train", *([base] if base else [])]
    for item in run.sets():
        cmd += ["--set", item]
    return [*cmd, "--run-dir", str(run.run_dir)]


def threads_per_job(jobs: int) -> int:
    """CPU threads each of ``jobs`` concurrent runs gets, so they do not fight over cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // jobs)


@dataclass
class Outcome:
    """How a run of this invocation ended."""

    run: PlannedRun
    action: str
    returncode: int | None  # None: skipped


def execute(study: Study, root: Path, planned: list[PlannedRun], *, jobs: int = 1,
            say: Callable[[str], None] = print) -> list[Outcome]:
    """Run what is left of ``planned``, ``jobs`` processes at a time.

    Each process gets ``OMP_NUM_THREADS`` (and the MKL / OpenBLAS equivalents) set to its share
    of the cores; its output goes to ``logs/<arm>-seed<k>.log``.

    Returns:
        One :class:`Outcome` per run: skipped ones with ``returncode`` None.
    """
    threads = str(threads_per_job(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    (root / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    (root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    outcomes, queue = [], []
    for run in planned:
        action = run_action(run)
        if action == "skip":
            outcomes.append(Outcome(run, action, None))
            say(f"{run.arm}-seed{run.seed}: already {rundir.run_status(run.run_dir).state}; "
                "skipped")
        else:
            queue.append((run, action))
    running: list[tuple[subprocess.Popen[bytes], PlannedRun, str, Any]] = []
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run, action = queue.pop(0)
                if action == "start" and run.run_dir.exists():
                    shutil.rmtree(run.run_dir)  # killed before its first checkpoint
                log = run.log.open("ab")
                say(f"{run.arm}-seed{run.seed}: {'resuming' if action == 'resume' else 'starting'}"
                    f" (log: {run.log})")
                proc = subprocess.Popen(child_command(study, run, root, action), env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
                running.append((proc, run, action, log))
            time.sleep(0.2)
            for item in list(running):
                proc, run, action, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                outcomes.append(Outcome(run, action, proc.returncode))
                say(f"{run.arm}-seed{run.seed}: {_ending(proc.returncode)}")
    except KeyboardInterrupt:
        # Let the runs checkpoint and stop. SIGTERM, not SIGINT: a run that already got the
        # terminal's Ctrl-C would take a second SIGINT as "abort at once".
        for proc, _, _, _ in running:
            proc.send_signal(signal.SIGTERM)
        for proc, _, _, log in running:
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.kill()
            log.close()
        raise
    return outcomes


def _ending(returncode: int) -> str:
    if returncode == 0:
        return "finished"
    if returncode == DIVERGED_EXIT:
        return "diverged (stopped by the NaN guard); counted as such"
    return f"failed with exit code {returncode}; see its log"
