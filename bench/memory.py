"""Peak memory and step time with and without gradient checkpointing, side by side.

Method
------
Both arms train the same job with ``gearshift.train`` (the ``lm`` task), differing only in
``training.gradient_checkpointing``:

* model: a ``LlamaForCausalLM`` built from a config (default 8 layers, hidden 256, 4 heads,
  MLP 688, byte-level vocabulary of 259), from the same seed, so both arms start from identical
  weights; a model whose *activations* dominate its memory: long sequences (default 1,024
  tokens) and several sequences per step, against ~6 M parameters;
* data: the CPython reference manual (``pydoc_data.topics``), packed into ``seq_len`` sequences,
  in the same order for both arms; AdamW, constant LR, fp32, no clipping changes;
* cadence: ``log_every: 1`` (so that every step logs ``memory/peak_mb``), no evaluation during
  training, no checkpoints, no TensorBoard.

Each arm runs in a **fresh subprocess**, one after the other: a process's peak resident set
size never falls, so measuring both arms in one process would charge the first arm's peak to
the second. The figures per arm:

* ``peak MiB``: ``memory/peak_mb`` of the last step as gearshift logs it (CPU: the process's
  peak RSS; CUDA: ``torch.cuda.max_memory_allocated``);
* ``setup MiB``: the same peak measured when training starts (interpreter, torch, data, model,
  optimizer); ``training MiB`` = peak − setup, what the steps added (activations, gradients,
  optimizer state); on CUDA both come from the allocator;
* ``step s``: the median interval between consecutive ``on_step_end`` stamps after the first
  ``--warmup`` steps (lazy initialisation excluded);
* ``loss``: the loss of the last step. Gradient checkpointing recomputes the same forward
  pass, so the losses must agree (to float rounding): equal losses show both arms did the same
  training.

The ratios (``on / off``) are what to read; absolute figures depend on the machine. ``load`` is
the share of the machine's CPU time that went to other processes during the arm (Linux).

Run ``python bench/memory.py --help`` for the options.
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
from typing import Any

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_key, "1")

ARMS: tuple[str, ...] = ("off", "on")


def job_config(args: argparse.Namespace, arm: str, output_dir: str) -> dict[str, Any]:
    """The run both arms train; only ``training.gradient_checkpointing`` differs."""
    return {
        "name": f"memory-{arm}", "seed": 1234, "output_dir": output_dir,
        "model": {"build": {"hidden_size": args.hidden, "intermediate_size": args.hidden * 43 // 16,
                            "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                            "max_position_embeddings": args.seq_len}},
        "data": {"seq_len": args.seq_len, "max_eval_sequences": args.batch},
        "optim": {"learning_rate": 1e-3},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "training": {"max_steps": args.steps + args.warmup, "batch_size": args.batch,
                     "gradient_checkpointing": arm == "on", "eval_every": None,
                     "log_every": 1},
        "checkpoint": {"enabled": False},
        "logging": {"progress_bar": False, "tensorboard": False},
    }


def run_arm(args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm in this process and return its figures (called in a subprocess)."""
    import torch

    import gearshift as gs
    from gearshift.train.memory import PEAK_METRIC, process_peak_rss_mb

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()

    class Stamps(gs.Callback):
        def __init__(self) -> None:
            self.setup_mb = 0.0
            self.ends: list[float] = []

        def on_train_start(self, trainer: gs.Trainer) -> None:
            self.setup_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                             else process_peak_rss_mb())

        def on_step_end(self, trainer: gs.Trainer, metrics: dict[str, float]) -> None:
            self.ends.append(time.perf_counter())

    stamps = Stamps()
    with tempfile.TemporaryDirectory() as out:
        result = gs.train(job_config(args, args.arm, out), callbacks=[stamps])
        lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").open()]
    steps = [m for m in lines if "loss" in m]
    gaps = [b - a for a, b in zip(stamps.ends[args.warmup - 1:], stamps.ends[args.warmup:],
                                  strict=False)]
    peak = steps[-1][PEAK_METRIC]
    return {"arm": args.arm, "device": "cuda" if cuda else "cpu", "peak_mb": peak,
            "setup_mb": stamps.setup_mb, "training_mb": peak - stamps.setup_mb,
            "step_s": statistics.median(gaps), "loss": steps[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per arm (default 4)")
    p.add_argument("--warmup", type=int, default=1, choices=range(1, 100), metavar="N",
                   help="untimed first steps, at least 1 (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # the subprocess's own arm
    args = p.parse_args()
    if args.arm is not None:
        print(json.dumps(run_arm(args)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine_busy_s, percent

    rows = []
    for arm in ARMS:
        busy0, wall0, own0 = machine_busy_s(), time.monotonic(), os.times()
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--arm", arm],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        own = os.times()
        busy1, wall = machine_busy_s(), time.monotonic() - wall0
        mine = (own.children_user - own0.children_user) + (own.children_system
                                                           - own0.children_system)
        cores = os.cpu_count() or 1
        row["load"] = None if busy0 is None or busy1 is None else max(
            0.0, (busy1 - busy0 - mine) / (wall * cores))
        rows.append(row)
    off, on = rows
    unit = "CUDA max allocated" if off["device"] == "cuda" else "peak RSS"
    print(f"{args.layers} layers, hidden {args.hidden}, seq {args.seq_len}, batch {args.batch}, "
          f"{args.steps} timed steps, {args.threads} threads, {off['device']} ({unit})")
    print(f"{'gradient checkpointing':24}{'peak MiB':>10}{'setup MiB':>11}{'training MiB':>14}"
          f"{'step s':>9}{'loss':>10}{'load':>7}")
    for row in rows:
        print(f"{row['arm']:24}{row['peak_mb']:>10.0f}{row['setup_mb']:>11.0f}"
              f"{row['training_mb']:>14.0f}{row['step_s']:>9.2f}{row['loss']:>10.4f}"
              f"{percent(row['load']):>7}")
    ratios = {k: on[k] / off[k] for k in ("peak_mb", "training_mb", "step_s")}
    print(f"{'ratio on/off':24}{ratios['peak_mb']:>9.2f}x{'':>11}{ratios['training_mb']:>13.2f}x"
          f"{ratios['step_s']:>8.2f}x{abs(on['loss'] - off['loss']):>10.1e}")
    if args.json is not None:
        args.json.write_text(json.dumps({"arms": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
