"""Does REINFORCE raise held-out accuracy, and which baseline gives the quietest gradient?

A chat model is first fine-tuned (``task: sft``) on 2-digit addition under the ``concise``
profile for ``--sft-steps`` steps: the *start*, right some of the time. From it, with
``task: reinforce`` and the exact-match reward:

* **seeds** — for each of ``--seeds``, ``--episodes`` sampled answers with the example's
  settings (``examples/reinforce.yaml``: baseline leave_one_out); held-out greedy exact match
  before and after (the last policy, not the best one: no selection on the held-out set),
  episodes, wall time.
* **ablation** — one seed, ``--ablation-episodes`` each, baseline none, moving_average,
  leave_one_out, value, value + GAE: final held-out exact match, and the variance of the
  policy-gradient estimate: ``--grad-batches`` independent batches of sampled answers at the
  *start* policy (the same prompts and RNG seeds for every arm; value arms with the value head
  their run learned), reported as the mean squared distance of a batch's gradient from the
  mean gradient, relative to the mean gradient's squared norm.

Usage::

    nice -n 10 .venv/bin/python bench/rl.py                       # everything (2-digit task)
    nice -n 10 .venv/bin/python bench/rl.py --digits 1 --sft-steps 60 --episodes 0 \
        --ablation-episodes 0                                     # only a start model
    nice -n 10 .venv/bin/python bench/rl.py --digits 1 --start DIR --episodes 1600 \
        --ablation-episodes 640 --grad-batches 6

On the shared 2-core machine (load average 5-14): the 2-digit sft start of 300 steps took
20 min, the 1-digit one of 60 steps 3 min, and one REINFORCE run 1-5 min per 1,600 episodes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import gearshift as gs

MODEL = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 128}
DATA = {"source": "synthetic", "seq_len": 64,
        "synthetic": {"name": "addition", "num_train": 20000, "num_eval": 200,
                      "options": {"digits": 2}}}
PROFILE = {"name": "concise", "date": "2026-12-03"}
QUIET = {"progress_bar": False, "tensorboard": False}

ARMS = {"none": {"baseline": "none"}, "moving_average": {"baseline": "moving_average"},
        "leave_one_out": {"baseline": "leave_one_out"}, "value": {"baseline": "value"},
        "value+GAE": {"baseline": "value", "use_gae": True}}


def quiet_train(cfg: dict[str, Any]) -> tuple[gs.RunResult, float]:
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        result = gs.train(cfg)
    return result, time.perf_counter() - start


def set_digits(digits: int) -> None:
    """The addition problems the whole bench uses (2 = the examples' task)."""
    DATA["synthetic"]["options"] = {"digits": digits}
    if digits == 1:  # 100 problems in all: the eval split holds about 12 of them
        DATA["synthetic"]["num_eval"] = 200


def sft_start(out: Path, steps: int) -> Path:
    cfg = {"task": "sft", "name": "start", "seed": 1234, "output_dir": str(out),
           "model": {"build": MODEL, "tokenizer": "byte"}, "data": DATA, "profile": PROFILE,
           "eval": {"generate": {"num_samples": 200, "max_new_tokens": 4}},
           "optim": {"learning_rate": 5e-3},
           "schedule": {"name": "warmup_cosine", "warmup_steps": 20},
           "training": {"max_steps": steps, "batch_size": 32, "eval_every": None,
                        "log_every": 50},
           "checkpoint": {"every": 100_000}, "logging": QUIET}
    result, wall = quiet_train(cfg)
    print(f"start: sft {steps} steps in {wall:.0f}s, held-out exact match "
          f"{result.metrics['eval/exact_match']:.3f}", flush=True)
    assert result.final_dir is not None
    return result.final_dir


def rl_config(out: Path, start: Path, seed: int, name: str, episodes: int,
              **rl: Any) -> dict[str, Any]:
    """The settings of examples/reinforce.yaml, at ``episodes`` episodes."""
    return {"task": "reinforce", "name": name, "seed": seed, "output_dir": str(out),
            "model": {"path": str(start)}, "data": DATA, "profile": PROFILE,
            "rl": {"prompts_per_step": 16, "samples_per_prompt": 4, "num_episodes": episodes,
                   "max_new_tokens": DATA["synthetic"]["options"]["digits"] + 2, "temperature": 1.0, "validation_every": 1000,
                   "patience": None, "keep": "last", **rl},
            "optim": {"learning_rate": 2e-3},
            "schedule": {"name": "warmup_cosine", "warmup_steps": 5},
            "training": {"log_every": 10}, "checkpoint": {"every": 100_000},
            "logging": QUIET}


def rl_run(cfg: dict[str, Any]) -> dict[str, Any]:
    result, wall = quiet_train(cfg)
    m = result.metrics
    return {"before": m["eval/exact_match_before"], "after": m["eval/exact_match"],
            "steps": result.step, "episodes": result.step * 64, "wall_s": wall,
            "run_dir": str(result.run_dir)}


def gradient_variance(cfg: dict[str, Any], value_head: dict[str, torch.Tensor] | None,
                      batches: int) -> float:
    """E||g - mean g||^2 / ||mean g||^2 over ``batches`` batches at the start policy."""
    from gearshift.tasks.reinforce import ReinforceTask
    from gearshift.tasks.value_head import ValueHeadTransform

    with contextlib.redirect_stderr(io.StringIO()):
        task = ReinforceTask(gs.load_config(cfg))
        parts = task.build()
    model = parts.model
    if value_head is not None:
        model = ValueHeadTransform().apply(model)
        model.value_head.load_state_dict(value_head)
    params = [p for n, p in model.named_parameters() if not n.startswith("value_head")]
    grads = []
    for b in range(batches):
        torch.manual_seed(10_000 + b)
        index = torch.randperm(len(parts.train_data))[:16]
        model.zero_grad()
        task.start_attempt()
        task.loss(model, {"index": index}).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
    g = torch.stack(grads)
    mean = g.mean(0)
    return float(((g - mean) ** 2).sum(1).mean() / (mean ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=6400)
    parser.add_argument("--ablation-episodes", type=int, default=3200)
    parser.add_argument("--grad-batches", type=int, default=12)
    parser.add_argument("--digits", type=int, default=2, help="addition of n-digit numbers")
    parser.add_argument("--start", type=Path, default=None, help="a start model (skips sft)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    set_digits(args.digits)
    out = Path(tempfile.mkdtemp(prefix="gearshift-bench-rl-"))
    begin = time.perf_counter()
    start = args.start or sft_start(out, args.sft_steps)
    if not args.seeds or not (args.episodes or args.ablation_episodes):
        print(f"start model: {start}")
        return
    report: dict[str, Any] = {"seeds": {}, "ablation": {}}
    for seed in args.seeds if args.episodes else []:
        r = rl_run(rl_config(out, start, seed, f"seed{seed}", args.episodes))
        report["seeds"][seed] = r
        print(f"seed {seed}: exact match {r['before']:.3f} -> {r['after']:.3f} "
              f"({100 * (r['after'] - r['before']):+.1f} points), {r['episodes']} episodes, "
              f"{r['wall_s']:.0f}s", flush=True)
    if report["seeds"]:
        gains = [100 * (r["after"] - r["before"]) for r in report["seeds"].values()]
        print(f"mean gain {statistics.mean(gains):+.1f} points over {len(gains)} seeds "
              f"(min {min(gains):+.1f})", flush=True)
    if args.ablation_episodes:
        for arm, rl in ARMS.items():
            cfg = rl_config(out, start, args.seeds[0], arm.replace("+", "_"),
                            args.ablation_episodes, **rl)
            r = rl_run(cfg)
            head = None
            if rl["baseline"] == "value":
                from safetensors.torch import load_file

                ckpt = sorted(Path(r["run_dir"], "checkpoints").glob("step-*"))[-1]
                weights = load_file(ckpt / "model.safetensors")
                head = {k.removeprefix("value_head."): v for k, v in weights.items()
                        if k.startswith("value_head.")}
            r["grad_variance"] = gradient_variance(cfg, head, args.grad_batches)
            report["ablation"][arm] = r
            print(f"{arm:>15}: exact match {r['before']:.3f} -> {r['after']:.3f}, relative "
                  f"gradient variance {r['grad_variance']:.2f}, {r['wall_s']:.0f}s", flush=True)
    print(f"total {time.perf_counter() - begin:.0f}s; runs in {out}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
