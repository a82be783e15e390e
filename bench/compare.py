"""What `gearshift compare --jobs N` buys, and what the end-of-run report costs.

Method
------
One tiny study (2 arms x 2 seeds, a 2-layer Llama of hidden size 64 on 24 KB of the Python
reference manual, ``--steps`` optimizer steps each, evaluation every quarter) is run by
``gearshift compare`` with ``--jobs 1`` and with ``--jobs J`` into separate folders, alternating
which goes first each round. Each study is timed from the command's start to its exit (process
start-ups and the comparison report included); the table gives both wall times and their ratio
per round. Every study computes the same runs, and the script checks that ``stats.json`` agrees
between them (final metrics equal up to float noise between 1 and N threads per run).

Second: the cost of the report that ``gearshift train`` writes at its end, as a fraction of the
run's own training time. For each run of the ``--jobs 1`` study, ``write_report`` is timed in
this process (matplotlib imported before the first) and divided by the run's active training
time from its events.

"machine busy" is the share of all CPU time that was busy while the bench ran, this bench's
own processes included (``/proc/stat``); the bench alone cannot fill the cores all the time
(imports, evaluation, waiting), so a share near 100% means other work competed with it and the
ratios deserve a rerun on a quiet machine.

    .venv/bin/python bench/compare.py                # 1 round, 60 steps per run, --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_busy_s, percent  # noqa: E402


def study(root: Path, corpus: Path, steps: int, out: str) -> Path:
    base = {"model": {"build": {"hidden_size": 64, "intermediate_size": 176,
                                "num_hidden_layers": 2, "num_attention_heads": 4,
                                "max_position_embeddings": 128}},
            "data": {"source": "text", "paths": [str(corpus)], "seq_len": 64},
            "training": {"max_steps": steps, "batch_size": 8, "eval_every": max(steps // 4, 1),
                         "log_every": 5},
            "checkpoint": {"every": steps}, "logging": {"progress_bar": False}}
    spec = {"name": "bench", "base": base, "seeds": [1, 2], "control": "control",
            "arms": [{"name": "control", "set": {"schedule.name": "constant"}},
                     {"name": "warmup", "set": {"schedule.name": "warmup_cosine"}}],
            "output_dir": str(root / out)}
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_study(path: Path, jobs: int) -> tuple[float, Path]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gearshift", "compare", str(path), "--jobs",
                           str(jobs)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    folder = next(Path(yaml.safe_load(path.read_text())["output_dir"]).iterdir())
    return wall, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from gearshift.data import pydoc_topics
    from gearshift.report import load_run, write_report

    root = Path(tempfile.mkdtemp(prefix="gs-bench-compare-"))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(pydoc_topics()[:40])[:24_000], encoding="utf-8")
    busy0, wall0 = machine_busy_s(), time.time()
    print(f"round  jobs=1 s  jobs={args.jobs} s  speed-up")
    speedups, report_share = [], []
    for r in range(args.rounds):
        order = [1, args.jobs] if r % 2 == 0 else [args.jobs, 1]
        walls, folders = {}, {}
        for jobs in order:
            walls[jobs], folders[jobs] = run_study(study(root, corpus, args.steps,
                                                         f"r{r}-j{jobs}"), jobs)
        speedups.append(walls[1] / walls[args.jobs])
        print(f"{r:5d}  {walls[1]:8.1f}  {walls[args.jobs]:8.1f}  {speedups[-1]:7.2f}x")
        a, b = (json.loads((folders[j] / "report" / "stats.json").read_text())
                for j in (1, args.jobs))
        for arm in a["arms"]:
            fa, fb = a["arms"][arm]["final"]["mean"], b["arms"][arm]["final"]["mean"]
            if abs(fa - fb) > 1e-3 * abs(fa):
                print(f"  warning: {arm} final differs between the studies: {fa} vs {fb}")
        for run in (folders[1] / "runs").iterdir():
            data = load_run(run)
            start = time.perf_counter()
            write_report(run)
            report_share.append((time.perf_counter() - start) / data.status.active_seconds)
    cpus = os.cpu_count() or 1
    busy1 = machine_busy_s()
    busy = None
    if busy0 is not None and busy1 is not None:
        total = (time.time() - wall0) * cpus
        busy = min(1.0, (busy1 - busy0) / total) if total else None
    print(f"median speed-up with --jobs {args.jobs}: {statistics.median(speedups):.2f}x "
          f"({cpus} CPUs)")
    print(f"report at the end of a run: {statistics.median(report_share):.1%} of its training "
          f"time (median of {len(report_share)} runs)")
    print(f"machine busy: {percent(busy)}")


if __name__ == "__main__":
    main()
