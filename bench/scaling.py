"""Step-rate scaling from 1 to 2 processes on this machine (DDP and FSDP, gloo on CPU).

Runs, one after the other in one invocation, the same small Llama:

- 1 process, global batch B;
- 2 processes through ``gearshift launch``, B/2 each (the same global batch: strong scaling);
- 2 processes, B each (twice the samples per step: weak scaling);
- the strong-scaling run again with ``distributed.strategy: fsdp``.

Each process gets one thread (``OMP_NUM_THREADS=1``) so that 2 processes use the 2 cores a
single process with one thread leaves idle. Throughput comes from the run's own
``tokens_per_s`` (metrics.jsonl), the first steps left out (start-up). Prints ratios to the
1-process run and the machine's load. Usage: ``python bench/scaling.py [--steps 30]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_busy_s, percent  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp: Path, steps: int, batch: int, strategy: str) -> Path:
    from gearshift.data import pydoc_topics

    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n\n".join(pydoc_topics()[:200]), encoding="utf-8")
    cfg = {"name": "scale", "seed": 1, "output_dir": str(tmp / "runs"),
           "model": {"build": {"hidden_size": 128, "intermediate_size": 344,
                               "num_hidden_layers": 2, "num_attention_heads": 4}},
           "data": {"source": "text", "paths": [str(corpus)], "seq_len": 128},
           "training": {"max_steps": steps, "batch_size": batch, "eval_every": None,
                        "log_every": 1},
           "schedule": {"name": "constant"},
           "checkpoint": {"enabled": False}, "report": {"enabled": False},
           "logging": {"progress_bar": False, "tensorboard": False},
           "distributed": {"strategy": strategy}}
    path = tmp / f"{strategy}-{batch}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run(tmp: Path, name: str, processes: int, cfg: Path, skip: int) -> dict[str, float]:
    run_dir = tmp / name
    verb = ["train", str(cfg), "--run-dir", str(run_dir)]
    command = [sys.executable, "-m", "gearshift", *verb] if processes == 1 else \
        [sys.executable, "-m", "gearshift", "launch", "--num_processes", str(processes),
         "--main_process_port", str(free_port()), "--", *verb]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    rows = [r for r in rows if "tokens_per_s" in r][skip:]
    tokens = sum(r["tokens_per_s"] for r in rows) / len(rows)
    return {"tokens_per_s": tokens, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch B of the 1-process run")
    args = parser.parse_args()
    skip = 5
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        busy0, t0 = machine_busy_s(), time.perf_counter()
        b = args.batch
        results = {
            "1 process, batch B": run(tmp, "one", 1, config(tmp, args.steps, b, "ddp"), skip),
            "2 processes DDP, B/2 each (same global batch)":
                run(tmp, "ddp-strong", 2, config(tmp, args.steps, b // 2, "ddp"), skip),
            "2 processes DDP, B each (2x global batch)":
                run(tmp, "ddp-weak", 2, config(tmp, args.steps, b, "ddp"), skip),
            "2 processes FSDP, B/2 each (same global batch)":
                run(tmp, "fsdp-strong", 2, config(tmp, args.steps, b // 2, "fsdp"), skip),
        }
        busy1, t1 = machine_busy_s(), time.perf_counter()
    base = results["1 process, batch B"]["tokens_per_s"]
    print(f"{args.steps} steps per run, B={args.batch}, seq_len 128, first {skip} steps left out; "
          f"{os.cpu_count()} CPU cores")
    print(f"{'run':<50} {'tokens/s':>10} {'vs 1 process':>13} {'wall s':>8}")
    for label, r in results.items():
        print(f"{label:<50} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / base:>12.2f}x "
              f"{r['wall_s']:>8.1f}")
    share = None if busy0 is None or busy1 is None else \
        (busy1 - busy0) / ((t1 - t0) * (os.cpu_count() or 1))
    print(f"machine busy while measuring: {percent(share)} of all cores; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
