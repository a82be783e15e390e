"""Kill the training daemon at random instants over a queue of files; count what was lost.

Method
------
Two daemon directories are set up with the same config (a ~20k-parameter chat model with LoRA,
gradient checkpointing, synchronous checkpoints every 2 steps with a small write delay, and short
``daemon.stage_delay_s`` pauses so that the snapshot, switch and move-to-``done/`` windows are
wide enough to be hit) and the same queue of ``--files`` JSONL files (``--lines`` conversations
each, dropped oldest first):

1. **reference**: ``python -m gearshift daemon run REF --drain`` once, uninterrupted (timed:
   files per hour).
2. **chaos**: ``python -m gearshift daemon run CHAOS --drain`` in a subprocess, SIGKILLed a
   uniform random 0 .. ``--max-life`` seconds after it is up (holds ``daemon.pid``), or for a
   ``--startup-share`` of the kills 0 .. ``--startup-window`` seconds after launch, again and
   again, until ``--kills`` kills have landed; then one last launch runs to the end. After each kill the harness notes
   where it landed (from the file's job record and what the launch left: a ``.tmp-*`` snapshot
   folder it wrote means mid-snapshot-write; a run without checkpoints means set-up or before
   the first checkpoint) and checks that ``current_model`` verifies (sha256 of every
   file against the snapshot manifest) and is a valid model directory (a "corrupt snapshot
   loaded" otherwise: the next daemon would start from it).

Counted at the end: files lost (dropped but not in ``done/``), files trained twice (a file with
more than one run, or a run with more than one fresh ``start`` event), resumes (``resume``
events: a killed run continued from its checkpoint), and final-model mismatches: for every file,
its snapshot's tensors against the reference's (``torch.equal``), and the final
``current_model``.

Run ``python bench/daemon_chaos.py --help`` for the options; the defaults take a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

CONFIG: dict[str, Any] = {
    "name": "chaos", "task": "sft", "seed": 3,
    "model": {"tokenizer": "auto", "build": {"hidden_size": 32, "intermediate_size": 64,
                                             "num_hidden_layers": 1, "num_attention_heads": 2,
                                             "max_position_embeddings": 128}},
    "data": {"source": "jsonl", "seq_len": 96, "eval_fraction": 0.1},
    "profile": {"name": "concise", "date": "2026-12-03"},
    "lora": {"enabled": True, "r": 4, "alpha": 8},
    "optim": {"learning_rate": 3e-3},
    "schedule": {"name": "warmup_cosine", "warmup_steps": 1},
    "training": {"epochs": 1, "batch_size": 4, "gradient_checkpointing": True,
                 "eval_every": None, "log_every": 1},
    "checkpoint": {"every": 2, "keep_last": 3, "async": False},
    "faults": {"checkpoint_write_delay_s": 0.05},
    "logging": {"progress_bar": False, "tensorboard": False},
    "daemon": {"settle_seconds": 0, "poll_seconds": 0.2, "status_every_seconds": 1,
               "keep_snapshots": 100,
               "stage_delay_s": {"train_end": 1.0, "snapshot_file": 0.3, "switch": 1.0,
                                 "done": 1.0}},
}


def write_file(path: Path, n: int, offset: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(offset, offset + n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"{i % 10}+{i % 7}="},
                                              {"role": "assistant",
                                               "content": str(i % 10 + i % 7)}]}) + "\n")


def setup(root: Path, name: str, files: int, lines: int) -> Path:
    base = root / name
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    subprocess.run([sys.executable, "-m", "gearshift", "daemon", "init", str(base), "--config",
                    str(config)], check=True, stdout=subprocess.DEVNULL)
    now = time.time()
    for i in range(files):
        tmp = base / "inbox" / f".f{i:02d}.tmp"
        write_file(tmp, lines, offset=i * 3)
        final = base / "inbox" / f"f{i:02d}.jsonl"
        os.replace(tmp, final)
        os.utime(final, (now - 1000 + i, now - 1000 + i))
    return base


def launch(base: Path) -> subprocess.Popen[bytes]:
    log = (base / "subprocess.out").open("ab")
    return subprocess.Popen([sys.executable, "-m", "gearshift", "daemon", "run", str(base),
                             "--drain", "--background"], stdout=log, stderr=log,
                            start_new_session=True)


def is_up(base: Path, proc: subprocess.Popen[bytes]) -> bool:
    from gearshift.daemon.lock import read_pid

    return read_pid(base / "daemon.pid") == proc.pid


def up(base: Path, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the daemon holds its lock (imports and checks done)."""
    while not is_up(base, proc) and proc.poll() is None:
        time.sleep(0.02)


def where(base: Path, since: float) -> str:
    """Where a kill landed, from what the daemon launched at ``since`` left behind."""
    from gearshift.daemon import DaemonPaths
    from gearshift.daemon.jobs import all_jobs

    if any(p.stat().st_mtime >= since for p in (base / "snapshots").glob(".tmp-*")):
        return "snapshot write"
    processing = [p.name for p in (base / "processing").iterdir()]
    if not processing:
        return "idle / between files"
    jobs = [j for j in all_jobs(DaemonPaths(base)) if j.file == processing[0] and j.stage not in ("done", "failed")]
    if not jobs:
        return "taking a file"
    job = jobs[-1]
    if job.stage == "training":
        checkpoints = list((job.run_dir(DaemonPaths(base)) / "checkpoints").glob("step-*"))
        # With a checkpoint, the launch was resuming the run (set-up) or training on from it.
        return "run with a checkpoint" if checkpoints else "run before its first checkpoint"
    return {"trained": "after training, before snapshot",
            "switched": "after switch, before done/"}.get(job.stage, job.stage)


def current_ok(base: Path) -> bool:
    from gearshift.daemon import DaemonPaths, verify_snapshot
    from gearshift.daemon.snapshots import current_snapshot
    from gearshift.models import validate_model_dir

    current = current_snapshot(DaemonPaths(base))
    return current is not None and not verify_snapshot(current) and \
        validate_model_dir(current).ok


def weights(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (directory / "adapter_model.safetensors").exists() \
        else "model.safetensors"
    return load_file(str(directory / name))


def same(a: Path, b: Path) -> bool:
    import torch

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def events(run: Path, kind: str) -> int:
    path = run / "events.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.open() if line.strip() and json.loads(line)["event"] == kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=14, help="files in the queue")
    ap.add_argument("--lines", type=int, default=32, help="conversations per file")
    ap.add_argument("--kills", type=int, default=24, help="SIGKILLs to land (>= 20)")
    ap.add_argument("--max-life", type=float, default=15.0,
                    help="a kill lands a uniform 0..MAX_LIFE s after the daemon is up")
    ap.add_argument("--startup-share", type=float, default=0.15,
                    help="share of kills aimed at the start-up instead (0..STARTUP_WINDOW s "
                         "after launch)")
    ap.add_argument("--startup-window", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="gs-daemon-chaos-"))
    ref, chaos = (setup(root, n, args.files, args.lines) for n in ("ref", "chaos"))

    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "gearshift", "daemon", "run", str(ref), "--drain",
                    "--background"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    ref_seconds = time.monotonic() - t0

    kills, landed, corrupt, launches = 0, Counter(), 0, 0
    t0 = time.monotonic()
    while True:
        launched_at = time.time()
        proc = launch(chaos)
        launches += 1
        if kills >= args.kills:
            code = proc.wait()
            break
        at_startup = rng.random() < args.startup_share
        if not at_startup:
            up(chaos, proc)
        life = rng.uniform(0.0, args.startup_window if at_startup else args.max_life)
        try:
            code = proc.wait(timeout=life)
            break  # finished the queue before the kill: done
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kills += 1
        landed["start-up" if at_startup and not is_up(chaos, proc) else where(chaos, launched_at)] += 1
        corrupt += not current_ok(chaos)
    chaos_seconds = time.monotonic() - t0
    if kills < args.kills:
        print(f"note: the queue was done after {kills} kills; use more --files for "
              f"{args.kills}")
    if code != 0:
        sys.exit(f"the last launch failed with code {code}; see {chaos}/logs/daemon.log")

    from gearshift.daemon import DaemonPaths
    from gearshift.daemon.jobs import all_jobs

    dropped = {f"f{i:02d}.jsonl" for i in range(args.files)}
    done = {p.name for p in (chaos / "done").iterdir() if not p.name.endswith(".json")}
    jobs = all_jobs(DaemonPaths(chaos))
    runs_per_file = Counter(j.file for j in jobs)
    twice = {f for f, n in runs_per_file.items() if n > 1}
    twice |= {j.file for j in jobs if events(j.run_dir(DaemonPaths(chaos)), "start") > 1}
    resumes = sum(events(j.run_dir(DaemonPaths(chaos)), "resume") for j in jobs)
    mismatches = 0
    for name in sorted(dropped & done):
        a = json.loads((chaos / "done" / f"{name}.result.json").read_text())["snapshot"]
        b = json.loads((ref / "done" / f"{name}.result.json").read_text())["snapshot"]
        mismatches += not same(chaos / "snapshots" / a, ref / "snapshots" / b)
    final_same = same(chaos / "current_model", ref / "current_model")

    print(f"queue: {args.files} files x {args.lines} conversations; seed {args.seed}")
    print(f"reference (uninterrupted): {ref_seconds:.1f} s, "
          f"{args.files / ref_seconds * 3600:.0f} files/hour")
    print(f"chaos: {launches} launches, {chaos_seconds:.1f} s "
          f"({chaos_seconds / ref_seconds:.2f}x the reference's time)")
    print(f"kills:                         {kills}")
    for stage, n in landed.most_common():
        print(f"  landed {stage + ':':31s}{n}")
    print(f"resumes from a checkpoint:     {resumes}   (launches that got through set-up "
          "and continued a run)")
    print(f"files lost:                    {len(dropped - done)}   (goal 0)")
    print(f"files trained twice:           {len(twice)}   (goal 0)")
    print(f"final-model mismatches:        {mismatches + (not final_same)}   (goal 0; per-file "
          f"snapshots {mismatches}/{len(done)}, final current_model "
          f"{'identical' if final_same else 'DIFFERENT'})")
    print(f"corrupt snapshots loaded:      {corrupt}   (goal 0)")
    if args.keep:
        print(f"kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
