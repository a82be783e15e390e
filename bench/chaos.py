"""Kill-anywhere durability: SIGKILL a training run again and again, resume it, compare.

Method
------
One tiny job (a ~30k-parameter byte-level Llama on 24 KB of the Python reference manual,
batch 8 x 32 tokens, warmup-cosine, AdamW, ``log_every: 1``, a checkpoint every
``--checkpoint-every`` steps, ``keep_last: 3``, an evaluation every 10 steps) is written to a
temporary directory as a YAML config and trained with the real command line,
``python -m gearshift train CONFIG``, in subprocesses:

1. **reference**: trained once without interruption. While it runs, the harness polls
   ``checkpoints/`` every 0.5 ms and measures how long each checkpoint stays in its
   ``.tmp-step-*`` folder (the write time) and the start-up time, time per step and end time.
2. **victim** (per trial): trained again in its own output directory and killed with
   ``SIGKILL`` (its whole process group) ``--kills`` times. The kills aim at target steps drawn
   uniformly over the run (step ``steps + 1`` standing for its end: final evaluation, last
   checkpoint, export) and sorted, so they spread over the whole run; each in one of three
   manners:

   * ``checkpoint`` (share ``--mid-write-share``): the harness polls ``checkpoints/`` every
     0.5 ms for the ``.tmp-step-*`` folder of this process for the target step or later (a
     checkpoint being written), sleeps a uniform 0 to ``--write-jitter`` seconds (default 1.5x
     the measured write time, so different parts of the write are hit: model file, optimizer,
     trainer state, manifest, rename, ``latest`` swap, retention) and kills;
   * ``training``: once the launch has logged the step before the target, at a uniform moment
     of one step's time (of the end's time for the end target);
   * ``startup`` (share ``--startup-share``): a uniform moment of the start-up (imports, config,
     data, model, loading the checkpoint), whatever the target.

   After each kill the harness reads what the process left (a ``.tmp-step-*`` folder of the
   killed process means mid-checkpoint-write; ``.old-step-*`` mid-replace; ``.del-step-*``
   mid-retention; ``.tmp-latest-*`` mid-``latest``-swap; a new ``final.tmp`` / ``final.old``
   mid-export; a ``.config.yaml.tmp-*`` mid-config-rewrite; otherwise "elsewhere"), verifies
   every ``step-*`` checkpoint with ``gearshift.checkpoint.verify_checkpoint`` and works out
   which one a correct resume must load (the newest that verifies). Then it runs
   ``python -m gearshift resume RUN_DIR`` (which may be killed in turn) until a launch
   finishes. A kill before the first checkpoint exists must make ``resume`` refuse with exit 2
   ("no valid checkpoint"); the harness then starts the run over with ``train`` (a restart).

Checks: every ``resume`` event in ``events.jsonl`` must name the checkpoint the harness expected
and list in ``skipped_corrupt`` exactly the newer ones that failed verification (a corrupt
checkpoint loaded is a failure). When the victim finishes, its ``final/model.safetensors`` must
equal the reference's tensor for tensor (``torch.equal``) and ``metrics.jsonl`` must hold the
same (step, loss, lr, grad_norm) for every step and the same evaluations, as exact floats.
"steps redone" is the work lost to kills: the step reached when killed minus the step resumed
from, summed; it is bounded by the checkpoint cadence, and nothing else is lost.

Run ``python bench/chaos.py --help`` for the options; the defaults take a few minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from gearshift.checkpoint import verify_checkpoint

POLL_S = 0.0005
LAUNCH_TIMEOUT_S = 600.0
NOT_KILLED = "not killed (finished first)"
MODES = ("checkpoint", "training", "startup")
TMP_STEP = re.compile(r"^\.tmp-step-(\d{8,})-(\d+)-[0-9a-f]+$")
# What a kill can leave behind (relative to the run directory) -> where it landed.
LEFTOVERS = (
    ("checkpoints/.tmp-step-", "checkpoint-write"),
    ("checkpoints/.old-step-", "checkpoint-replace"),
    ("checkpoints/.del-step-", "retention"),
    ("checkpoints/.tmp-latest-", "latest-swap"),
    ("final.tmp", "final-export"),
    ("final.old", "final-export"),
    (".config.yaml.tmp-", "config-rewrite"),
    (".overrides.json.tmp-", "config-rewrite"),
    ("metrics.jsonl.tmp", "metrics-truncate"),
)


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Job:
    """The training job every run of one chaos session trains."""

    workdir: Path
    corpus: Path
    steps: int
    checkpoint_every: int
    keep_last: int
    threads: int
    train_seed: int = 7

    def config(self, output_dir: Path) -> dict[str, Any]:
        return {
            "name": "chaos",
            "seed": self.train_seed,
            "output_dir": str(output_dir),
            "model": {"build": {"hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2,
                                "max_position_embeddings": 64}},
            "data": {"source": "text", "paths": [str(self.corpus)], "seq_len": 32,
                     "eval_fraction": 0.05},
            "optim": {"learning_rate": 3e-3},
            "schedule": {"name": "warmup_cosine", "warmup_steps": 3},
            "training": {"max_steps": self.steps, "batch_size": 8, "eval_every": 10,
                         "log_every": 1},
            "checkpoint": {"every": self.checkpoint_every, "keep_last": self.keep_last},
            "logging": {"progress_bar": False, "tensorboard": False},
        }

    def write_config(self, output_dir: Path) -> Path:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "chaos.yaml"
        path.write_text(yaml.safe_dump(self.config(output_dir)), encoding="utf-8")
        return path


def make_job(workdir: Path, *, steps: int, checkpoint_every: int, keep_last: int,
             threads: int) -> Job:
    from gearshift.data import pydoc_topics

    if steps < 4:
        raise ValueError("steps must be at least 4 (the warmup is 3 steps)")
    corpus = workdir / "corpus.txt"
    corpus.write_text("\n\n".join(pydoc_topics()[:40])[:24_000], encoding="utf-8")
    return Job(workdir, corpus, steps, checkpoint_every, keep_last, threads)


class Launch:
    """One ``python -m gearshift ...`` process in its own process group, output to a file."""

    def __init__(self, args: list[str], cwd: Path, log_path: Path, threads: int) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # closed in wait()
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "gearshift", *args], cwd=cwd,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.killed = False

    def running(self) -> bool:
        return self.proc.poll() is None

    def sleep(self, seconds: float) -> bool:
        """Sleep while the process runs; False when it exited first."""
        try:
            self.proc.wait(timeout=max(seconds, 0.0))
            return False
        except subprocess.TimeoutExpired:
            return True

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the group this launch leads, nothing else
            self.killed = True
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait()
            self.killed = False  # a hang is an error, not one of the planned kills
        # A process that exited by itself just before the kill was not killed.
        self.killed = self.killed and rc == -signal.SIGKILL
        self._log.close()
        return rc

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------- reading runs


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a kill mid-write
        if isinstance(record, dict):
            out.append(record)
    return out


def history(run_dir: Path) -> list[tuple[Any, ...]]:
    """(step, loss, lr, grad_norm) of every logged optimizer step."""
    return [(m["step"], m["loss"], m["lr"], m["grad_norm"])
            for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]


def eval_history(run_dir: Path) -> list[tuple[Any, ...]]:
    return [(m["step"], m["eval/loss"])
            for m in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in m]


def last_step(run_dir: Path) -> int:
    return max((h[0] for h in history(run_dir)), default=0)


def find_run(output_dir: Path) -> Path | None:
    runs = sorted(p for p in output_dir.glob("chaos-*") if p.is_dir())
    return runs[-1] if runs else None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = [p for p in ckpts.iterdir() if p.name.startswith("step-") and p.is_dir()
             and not p.is_symlink()]
    return sorted(found, key=lambda p: p.name)


def verify_all(run_dir: Path) -> dict[str, list[str]]:
    """Checkpoint folder name -> problems ([] when it verifies), oldest first."""
    return {p.name: verify_checkpoint(p) for p in checkpoint_dirs(run_dir)}


def compare_runs(reference: Path, victim: Path) -> list[str]:
    """Every way ``victim`` differs from ``reference`` (empty when bit-identical)."""
    problems: list[str] = []
    a, b = reference / "final" / "model.safetensors", victim / "final" / "model.safetensors"
    if not b.is_file():
        problems.append(f"weights: {b} is missing")
    else:
        wa, wb = load_file(str(a)), load_file(str(b))
        if wa.keys() != wb.keys():
            problems.append(f"weights: tensor names differ ({sorted(wa.keys() ^ wb.keys())})")
        differ = [k for k in wa.keys() & wb.keys() if not torch.equal(wa[k], wb[k])]
        if differ:
            problems.append(f"weights: {len(differ)} tensor(s) differ, e.g. {sorted(differ)[0]}")
    for what, fn in (("loss/lr/grad_norm history", history), ("eval history", eval_history)):
        ha, hb = fn(reference), fn(victim)
        if ha != hb:
            first = next((i for i, (x, y) in enumerate(zip(ha, hb, strict=False)) if x != y),
                         min(len(ha), len(hb)))
            problems.append(f"{what}: {len(ha)} vs {len(hb)} records, first difference at "
                            f"index {first}: {ha[first:first + 1]} vs {hb[first:first + 1]}")
    return problems


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Measured on the reference run."""

    startup_s: float  # launch -> `start` event
    step_s: float  # mean time per optimizer step, checkpoints and evaluations included
    tail_s: float  # last step logged -> `end` event (final eval, checkpoint, export)
    write_s: float  # median time a checkpoint spends in its .tmp-step-* folder
    writes_seen: int


def train_reference(job: Job, log: Callable[[str], None] = print) -> tuple[Path, Timing]:
    """Train the job once without interruption, timing its start-up, steps and writes."""
    output_dir = job.workdir / "reference"
    launch = Launch(["train", str(job.write_config(output_dir))], job.workdir,
                    job.workdir / "reference.log", job.threads)
    appeared: dict[str, float] = {}
    writes: list[float] = []
    run_dir = None
    while launch.running():
        run_dir = run_dir or find_run(output_dir)
        if run_dir is not None:
            try:
                names = set(os.listdir(run_dir / "checkpoints"))
            except FileNotFoundError:
                names = set()
            now = time.perf_counter()
            for name in names:
                if TMP_STEP.match(name) and name not in appeared:
                    appeared[name] = now
            for name in [n for n in appeared if n not in names]:
                writes.append(now - appeared.pop(name))
        time.sleep(POLL_S)
    rc = launch.wait()
    if rc != 0:
        raise RuntimeError(f"the reference run failed (exit {rc}):\n{launch.output()[-2000:]}")
    run_dir = find_run(output_dir)
    assert run_dir is not None
    events = read_jsonl(run_dir / "events.jsonl")
    start = next(e["time"] for e in events if e["event"] == "start")
    end = next(e["time"] for e in events if e["event"] == "end")
    ckpt_times = [e["time"] for e in events if e["event"] == "checkpoint"]
    last = max((t for t in ckpt_times if t < end), default=end)
    timing = Timing(startup_s=max(start - launch.started, 0.1),
                    step_s=max(last - start, 0.01) / job.steps,
                    tail_s=max(end - last, 0.01),
                    write_s=statistics.median(writes) if writes else 0.01,
                    writes_seen=len(writes))
    log(f"reference: {job.steps} steps; start-up {timing.startup_s:.1f} s, "
        f"{timing.step_s * 1000:.0f} ms/step, checkpoint write {timing.write_s * 1000:.1f} ms "
        f"(median of {len(writes)}), end {timing.tail_s * 1000:.0f} ms")
    return run_dir, timing


# ----------------------------------------------------------------------------- one trial


@dataclass
class KillRecord:
    launch: int
    mode: str
    target: int  # the step aimed at; steps + 1 is the end of the run
    landed: str = NOT_KILLED
    step_reached: int = 0
    resumed_from: int | None = None
    corrupt_after: list[str] = field(default_factory=list)


@dataclass
class TrialResult:
    trial: int
    run_dir: str = ""
    finished: bool = False
    kills: list[KillRecord] = field(default_factory=list)
    resumes: int = 0
    restarts: int = 0
    resume_checks: int = 0
    corrupt_found: list[str] = field(default_factory=list)
    corrupt_loaded: list[str] = field(default_factory=list)
    wrong_resume: list[str] = field(default_factory=list)
    leftovers_at_end: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    steps_redone: int = 0
    seconds: float = 0.0

    @property
    def killed(self) -> list[KillRecord]:
        return [k for k in self.kills if k.landed != NOT_KILLED]

    @property
    def ok(self) -> bool:
        return (self.finished and not self.mismatches and not self.errors
                and not self.corrupt_loaded and not self.wrong_resume)


def in_progress_files(run_dir: Path | None) -> set[tuple[str, int, int]]:
    """(name, inode, mtime) of every file a writer creates before it is complete."""
    if run_dir is None:
        return set()
    found = set()
    for folder, prefix in ((run_dir, ""), (run_dir / "checkpoints", "checkpoints/")):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            name = prefix + entry.name
            if any(name.startswith(p) for p, _ in LEFTOVERS):
                st = entry.stat(follow_symlinks=False)
                found.add((name, st.st_ino, st.st_mtime_ns))
    return found


def where_landed(run_dir: Path | None, before: set[tuple[str, int, int]]) -> str:
    new = {name for name, _, _ in in_progress_files(run_dir) - before}
    for prefix, where in LEFTOVERS:
        if any(n.startswith(prefix) for n in new):
            return where
    return "elsewhere"


class _Victim:
    """Book-keeping of one victim run across its launches: where it is and what a correct
    resume must do next."""

    def __init__(self, job: Job, trial_dir: Path, result: TrialResult,
                 log: Callable[[str], None]) -> None:
        self.job, self.trial_dir, self.result, self.log = job, trial_dir, result, log
        self.attempt = -1
        self.start_over()

    def start_over(self) -> None:
        self.attempt += 1
        self.output_dir = self.trial_dir / f"attempt-{self.attempt}"
        self.args = ["train", str(self.job.write_config(self.output_dir))]
        self.run_dir: Path | None = None
        self.expected: str | None = None  # the checkpoint a correct resume loads
        self.expected_skipped: set[str] = set()
        self.corrupt: set[str] = set()
        self.pending: KillRecord | None = None  # the last kill, waiting for its resume

    @property
    def expected_step(self) -> int:
        return int(self.expected.split("-")[1]) if self.expected else 0

    def find_run(self) -> Path | None:
        self.run_dir = self.run_dir or find_run(self.output_dir)
        return self.run_dir

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / "events.jsonl") if self.run_dir else []

    def check_resumes(self, events: list[dict[str, Any]], launch_no: int) -> None:
        """Each resume must load the newest checkpoint that verified, skipping the newer ones
        that did not."""
        r = self.result
        for event in events:
            if event.get("event") != "resume":
                continue
            r.resume_checks += 1
            loaded = Path(str(event.get("checkpoint"))).name
            skipped = {str(s).split(":", 1)[0] for s in event.get("skipped_corrupt", [])}
            if loaded in self.corrupt:
                r.corrupt_loaded.append(f"launch {launch_no}: loaded corrupt {loaded}")
            if loaded != self.expected or skipped != self.expected_skipped:
                r.wrong_resume.append(
                    f"launch {launch_no}: resumed from {loaded} skipping {sorted(skipped)}; "
                    f"expected {self.expected} skipping {sorted(self.expected_skipped)}")
            if self.pending is not None:
                self.pending.resumed_from = int(event.get("step", 0))
                r.steps_redone += max(0, self.pending.step_reached - self.pending.resumed_from)
                self.pending = None

    def after_kill(self, record: KillRecord, before: set[tuple[str, int, int]]) -> None:
        """Inspect what the kill left, verify every checkpoint, decide the next launch."""
        r = self.result
        record.landed = where_landed(self.run_dir, before)
        record.step_reached = last_step(self.run_dir) if self.run_dir else 0
        status = verify_all(self.run_dir) if self.run_dir else {}
        corrupt = {name for name, problems in status.items() if problems}
        for name in sorted(corrupt - self.corrupt):
            r.corrupt_found.append(f"{name}: {'; '.join(status[name])}")
        record.corrupt_after = sorted(corrupt)
        self.corrupt = corrupt
        valid = [name for name, problems in status.items() if not problems]
        self.expected = valid[-1] if valid else None
        self.expected_skipped = {n for n in corrupt if self.expected is None or n > self.expected}
        self.log(f"  trial {r.trial} launch {record.launch}: {record.mode} kill aimed at step "
                 f"{record.target} landed at step {record.step_reached} "
                 f"({record.landed}); resume must load "
                 f"{self.expected or 'nothing (no checkpoint yet)'}")
        if self.expected is not None:
            self.pending = record
            r.resumes += 1
            self.args = ["resume", str(self.run_dir)]
            return
        # Killed before any checkpoint: resume must refuse clearly; then the run starts over.
        if self.run_dir is not None:
            probe = Launch(["resume", str(self.run_dir)], self.trial_dir,
                           self.trial_dir / f"launch-{record.launch:02d}-probe.log",
                           self.job.threads)
            rc = probe.wait()
            if rc != 2 or "no valid checkpoint" not in probe.output():
                r.errors.append(f"resume without a valid checkpoint exited {rc}, not 2 with "
                                f"'no valid checkpoint': {probe.output()[-400:]}")
        r.steps_redone += record.step_reached
        r.restarts += 1
        self.start_over()


def _kill_at_write(launch: Launch, victim: _Victim, step: int, jitter: float,
                   rng: random.Random) -> None:
    """Kill soon after this process starts writing the checkpoint of ``step`` or a later one."""
    while launch.running():
        run_dir = victim.find_run()
        if run_dir is not None:
            try:
                names = os.listdir(run_dir / "checkpoints")
            except FileNotFoundError:
                names = []
            for name in names:
                m = TMP_STEP.match(name)
                if m and int(m.group(2)) == launch.pid and int(m.group(1)) >= step:
                    if jitter > 0:
                        time.sleep(rng.uniform(0.0, jitter))
                    launch.kill()
                    return
        time.sleep(POLL_S)


def _kill_in_step(launch: Launch, victim: _Victim, step: int, timing: Timing,
                  events_before: int, rng: random.Random) -> None:
    """Kill at a uniform moment of ``step`` (of the end of the run when step > steps)."""
    set_up = False
    while launch.running():
        run_dir = victim.find_run()
        if run_dir is not None:
            # Count only this launch's progress: metrics.jsonl is truncated to the resumed
            # step just before the resume event is written.
            set_up = set_up or any(e.get("event") in ("start", "resume")
                                   for e in victim.events()[events_before:])
            if set_up and last_step(run_dir) >= step - 1:
                span = timing.tail_s if step > victim.job.steps else timing.step_s
                if launch.sleep(rng.uniform(0.0, span)):
                    launch.kill()
                return
        time.sleep(POLL_S * 2)


def run_trial(index: int, job: Job, timing: Timing, *, kills: int, rng: random.Random,
              reference: Path, mid_write_share: float, startup_share: float,
              write_jitter: float | None, modes: list[str] | None = None,
              log: Callable[[str], None] = print) -> TrialResult:
    """Train the job, SIGKILL it ``kills`` times, resume each time, compare with ``reference``.

    ``modes`` fixes the manner of each kill (``checkpoint``, ``training`` or ``startup``); by
    default each is drawn with the given shares.
    """
    t0 = time.perf_counter()
    result = TrialResult(trial=index)
    trial_dir = job.workdir / f"trial-{index}"
    victim = _Victim(job, trial_dir, result, log)
    targets = sorted(rng.randint(1, job.steps + 1) for _ in range(kills))
    jitter = 1.5 * timing.write_s if write_jitter is None else write_jitter
    launch_no = 0
    while True:
        launch_no += 1
        events_before = len(victim.events())
        before = in_progress_files(victim.run_dir)
        launch = Launch(victim.args, trial_dir, trial_dir / f"launch-{launch_no:02d}.log",
                        job.threads)
        record: KillRecord | None = None
        if len(result.kills) < kills:
            draw = rng.random()
            mode = ("checkpoint" if draw < mid_write_share else
                    "startup" if draw < mid_write_share + startup_share else "training")
            if modes is not None:
                mode = modes[len(result.kills) % len(modes)]
            target = max(targets[len(result.kills)], victim.expected_step + 1)
            record = KillRecord(launch=launch_no, mode=mode, target=target)
            result.kills.append(record)
            if mode == "checkpoint":
                _kill_at_write(launch, victim, min(target, job.steps), jitter, rng)
            elif mode == "training":
                _kill_in_step(launch, victim, target, timing, events_before, rng)
            elif launch.sleep(rng.uniform(0.0, timing.startup_s)):
                launch.kill()
        rc = launch.wait()
        victim.find_run()
        victim.check_resumes(victim.events()[events_before:], launch_no)
        if launch.killed and record is not None:
            victim.after_kill(record, before)
            continue
        if rc != 0:
            result.errors.append(f"launch {launch_no} (gearshift {victim.args[0]}) exited {rc}: "
                                 f"{launch.output()[-800:]}")
        result.finished = rc == 0
        break
    if victim.run_dir is not None:
        result.run_dir = str(victim.run_dir)
        for name, problems in verify_all(victim.run_dir).items():
            if problems and name not in victim.corrupt:
                result.corrupt_found.append(f"{name} (at the end): {'; '.join(problems)}")
        result.leftovers_at_end = sorted(
            name for name, _, _ in in_progress_files(victim.run_dir)
            if name.startswith("checkpoints/") or name.startswith("final."))
        if result.finished:
            result.mismatches = compare_runs(reference, victim.run_dir)
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- the session


def run_chaos(*, trials: int = 3, kills: int = 10, seed: int = 0, steps: int = 60,
              checkpoint_every: int = 3, keep_last: int = 3, mid_write_share: float = 0.5,
              startup_share: float = 0.1, write_jitter: float | None = None, threads: int = 1,
              modes: list[str] | None = None, workdir: Path | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole experiment and return its summary (see :func:`summarize`)."""
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="gearshift-chaos-") if workdir is None else None
    root = Path(tmp.name) if tmp is not None else Path(str(workdir))
    root.mkdir(parents=True, exist_ok=True)
    try:
        job = make_job(root, steps=steps, checkpoint_every=checkpoint_every,
                       keep_last=keep_last, threads=threads)
        reference, timing = train_reference(job, log)
        rng = random.Random(seed)
        results = []
        for index in range(1, trials + 1):
            result = run_trial(index, job, timing, kills=kills, rng=rng, reference=reference,
                               mid_write_share=mid_write_share, startup_share=startup_share,
                               write_jitter=write_jitter, modes=modes, log=log)
            results.append(result)
            log(f"trial {index}: {'ok' if result.ok else 'FAILED'} "
                f"({len(result.killed)} kills, {result.seconds:.0f} s)")
        settings = dict(trials=trials, kills=kills, seed=seed, steps=steps,
                        checkpoint_every=checkpoint_every, keep_last=keep_last,
                        mid_write_share=mid_write_share, startup_share=startup_share,
                        write_jitter=write_jitter, threads=threads, modes=modes)
        return summarize(results, settings, timing, time.perf_counter() - started)
    finally:
        if tmp is not None:
            tmp.cleanup()


def summarize(results: list[TrialResult], settings: dict[str, Any], timing: Timing,
              seconds: float) -> dict[str, Any]:
    killed = [k for r in results for k in r.killed]
    landed: dict[str, int] = {}
    for k in killed:
        landed[k.landed] = landed.get(k.landed, 0) + 1
    kinds: dict[str, int] = {}
    for r in results:
        for m in r.mismatches:
            kind = m.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "settings": settings,
        "timing": asdict(timing),
        "seconds": round(seconds, 1),
        "trials": len(results),
        "finished": sum(r.finished for r in results),
        "kills": len(killed),
        "kills_attempted": sum(len(r.kills) for r in results),
        "kills_mid_checkpoint_write": landed.get("checkpoint-write", 0),
        "kills_by_mode": {m: sum(k.mode == m for k in killed) for m in MODES},
        "kills_landed": landed,
        "kill_steps": sorted(k.step_reached for k in killed),
        "resumes": sum(r.resumes for r in results),
        "resume_events_checked": sum(r.resume_checks for r in results),
        "restarts": sum(r.restarts for r in results),
        "steps_redone": sum(r.steps_redone for r in results),
        "mismatches": sum(len(r.mismatches) for r in results),
        "mismatch_kinds": kinds,
        "corrupt_found": sum(len(r.corrupt_found) for r in results),
        "corrupt_loaded": sum(len(r.corrupt_loaded) for r in results),
        "wrong_resume": sum(len(r.wrong_resume) for r in results),
        "errors": sum(len(r.errors) for r in results),
        "ok": all(r.ok for r in results),
        "results": [asdict(r) | {"ok": r.ok} for r in results],
    }


def print_report(summary: dict[str, Any]) -> None:
    s = summary["settings"]
    print(f"\nchaos: {summary['trials']} trial(s) x {s['kills']} SIGKILLs, {s['steps']} steps, "
          f"checkpoint every {s['checkpoint_every']} (keep {s['keep_last']}), seed {s['seed']}")
    print(f"{'trial':>5}  {'kills':>5}  {'mid-write':>9}  {'resumes':>7}  {'restarts':>8}  "
          f"{'redone':>6}  {'corrupt':>7}  {'mismatch':>8}  {'seconds':>7}  result")
    for r in summary["results"]:
        kills = [k for k in r["kills"] if k["landed"] != NOT_KILLED]
        mid = sum(k["landed"] == "checkpoint-write" for k in kills)
        print(f"{r['trial']:>5}  {len(kills):>5}  {mid:>9}  {r['resumes']:>7}  "
              f"{r['restarts']:>8}  {r['steps_redone']:>6}  {len(r['corrupt_found']):>7}  "
              f"{len(r['mismatches']):>8}  {r['seconds']:>7.0f}  {'ok' if r['ok'] else 'FAILED'}")
        for line in r["mismatches"] + r["errors"] + r["corrupt_loaded"] + r["wrong_resume"]:
            print(f"       ! {line}")
    landed = ", ".join(f"{n} {k}" for k, n in sorted(summary["kills_landed"].items()))
    modes = ", ".join(f"{n} {k}" for k, n in summary["kills_by_mode"].items())
    print(f"trials: {summary['trials']} ({summary['finished']} finished)")
    print(f"kills: {summary['kills']} of {summary['kills_attempted']} attempted, "
          f"{summary['kills_mid_checkpoint_write']} mid-checkpoint-write; aimed: {modes}; "
          f"landed: {landed or 'none'}; at steps {summary['kill_steps']}")
    print(f"resumes: {summary['resumes']} ({summary['resume_events_checked']} resume events "
          f"checked against the newest valid checkpoint, {summary['wrong_resume']} wrong); "
          f"restarts before any checkpoint: {summary['restarts']}; "
          f"steps redone: {summary['steps_redone']}")
    kinds = ", ".join(f"{k} {n}" for k, n in summary["mismatch_kinds"].items())
    print(f"mismatches: {summary['mismatches']}" + (f" ({kinds})" if kinds else
          " (final weights bit-identical; loss, lr, grad_norm and eval history equal)"))
    print(f"checkpoints found corrupt: {summary['corrupt_found']} "
          f"(loaded: {summary['corrupt_loaded']})")
    print(f"errors: {summary['errors']}; total {summary['seconds']:.0f} s; "
          f"result: {'PASS' if summary['ok'] else 'FAIL'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="victim runs (default 3)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs per trial (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--checkpoint-every", type=int, default=3, help="checkpoint cadence")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--mid-write-share", type=float, default=0.5,
                        help="share of kills aimed at a checkpoint being written (0.5)")
    parser.add_argument("--startup-share", type=float, default=0.1,
                        help="share of kills during start-up: imports, set-up, loading (0.1)")
    parser.add_argument("--write-jitter", type=float, default=None,
                        help="longest delay (s) from seeing a checkpoint folder to the kill "
                             "(default: 1.5x the write time measured on the reference run)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep every run here (default: a temporary directory, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.kills < 0 or args.checkpoint_every < 1 or args.keep_last < 1:
        parser.error("--trials, --checkpoint-every, --keep-last must be >= 1; --kills >= 0")
    if args.steps < 4:
        parser.error("--steps must be at least 4 (the warmup is 3 steps)")
    if not 0 <= args.mid_write_share + args.startup_share <= 1:
        parser.error("--mid-write-share + --startup-share must be within [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run_chaos(trials=args.trials, kills=args.kills, seed=args.seed, steps=args.steps,
                        checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
                        mid_write_share=args.mid_write_share, startup_share=args.startup_share,
                        write_jitter=args.write_jitter, threads=args.threads,
                        workdir=args.workdir)
    print_report(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
