"""How much quality does BitNet b1.58 quantization-aware training keep? Four arms, same steps.

For each seed, the embedded default model (a byte-level Llama on the Python reference manual)
is first pretrained in full precision for ``--pretrain`` steps (the *base*). From that base,
side by side, at equal steps (``--steps``) and with the same data, LR and schedule:

* ``full precision`` — the base fine-tuned ``--steps`` more steps without quantization;
* ``naive ternary`` — the base quantized after training (ternary weights, 8-bit activations),
  no training at all (the QAT-without-ramp run's evaluation before its first step);
* ``QAT`` — quantization-aware training from the base, λ = 1 from the first step;
* ``QAT + ramp`` — the same with λ rising linearly from 0 to 1 over ``--ramp`` steps.

Quality for language modelling is the information gained over a uniform guess over the V
tokens: ``ln V − eval loss`` (nats per token). Recovery = an arm's quality / the full-precision
arm's quality. Sizes on disk are those of the QAT run's packed ``final/`` against fp16.

The chat-task model (exact-match quality) does not exist yet in this project; when it does,
it gets its own arm set here.

Usage::

    .venv/bin/python bench/qat.py                               # 3 seeds, one after the other
    .venv/bin/python bench/qat.py --jobs 3 --threads 1          # the 3 seeds at once
    .venv/bin/python bench/qat.py --seeds 1 2 3 4 5 --steps 200 --json qat.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import gearshift as gs
from gearshift.data import load_tokenizer


def base_config(out: Path, seed: int, name: str, steps: int, args: argparse.Namespace,
                ) -> dict[str, Any]:
    return {"name": name, "seed": seed, "output_dir": str(out),
            "data": {"seq_len": args.seq_len, "max_eval_sequences": args.eval_sequences},
            "training": {"max_steps": steps, "eval_every": None, "log_every": 10},
            "checkpoint": {"every": 10_000},
            "logging": {"progress_bar": False, "tensorboard": False}}


def quiet_train(cfg: dict[str, Any]) -> gs.RunResult:
    with contextlib.redirect_stderr(io.StringIO()):
        return gs.train(cfg)


def one_seed(seed: int, args: argparse.Namespace, out: Path, ln_v: float) -> dict[str, Any]:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = quiet_train(base_config(out, seed, f"base{seed}", args.pretrain, args))
    assert base.final_dir is not None
    arms: dict[str, dict[str, Any]] = {
        "full precision": {},
        "QAT": {"quantization": {"method": "bitnet_b158"}},
        "QAT + ramp": {"quantization": {"method": "bitnet_b158",
                                        "ramp": {"steps": args.ramp}}},
    }
    losses: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for arm, extra in arms.items():
        cfg = base_config(out, seed, f"s{seed}-{arm.replace(' ', '').replace('+', '-')}",
                          args.steps, args)
        cfg["model"] = {"path": str(base.final_dir), "tokenizer": "byte"}
        cfg["optim"] = {"learning_rate": args.lr}
        cfg.update(extra)
        result = quiet_train(cfg)
        losses[arm] = result.metrics["eval/loss"]
        if arm == "QAT":
            losses["naive ternary"] = result.metrics["eval/loss_before"]
            final = result.final_dir
            sizes["packed"] = (final / "model.safetensors").stat().st_size
    losses["base (before fine-tuning)"] = base.metrics["eval/loss"]
    from safetensors import safe_open

    with safe_open(str(base.final_dir / "model.safetensors"), framework="pt") as f:
        sizes["fp16"] = 2 * sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    quality = {arm: ln_v - loss for arm, loss in losses.items()}
    return {"seed": seed, "loss": losses, "quality": quality,
            "recovery": {arm: q / quality["full precision"] for arm, q in quality.items()},
            "bytes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pretrain", type=int, default=200, help="full-precision steps of the "
                        "base model")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of every arm")
    parser.add_argument("--ramp", type=int, default=50, help="λ ramp steps of the ramp arm")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR of the fine-tuning arms")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-sequences", type=int, default=64,
                        help="held-out sequences evaluated (the same for every arm)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ln_v = math.log(len(load_tokenizer("byte", None)))
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one_seed, seed, args, Path(tmp), ln_v) for seed in args.seeds]
        for future in futures:
            rows.append(future.result())
            print(f"seed {rows[-1]['seed']}: " + ", ".join(
                f"{a} {v:.4f}" for a, v in rows[-1]["loss"].items()), flush=True)
    order = ["base (before fine-tuning)", "full precision", "naive ternary", "QAT", "QAT + ramp"]
    print(f"\nembedded default model, {len(args.seeds)} seeds, base {args.pretrain} steps, "
          f"arms {args.steps} steps (ramp {args.ramp}), seq_len {args.seq_len}, "
          f"{args.eval_sequences} eval sequences, ln V = {ln_v:.4f} (V = "
          f"{round(math.exp(ln_v))}); {time.perf_counter() - start:.0f} s")
    print(f"{'arm':<26} {'eval loss':>16} {'quality ln V - loss':>22} {'recovery':>16}")
    for arm in order:
        loss = [r["loss"][arm] for r in rows]
        qual = [r["quality"][arm] for r in rows]
        rec = [r["recovery"][arm] for r in rows]
        print(f"{arm:<26} {_ms(loss):>16} {_ms(qual):>22} {_ms(rec, pct=True):>16}")
    b = rows[0]["bytes"]
    print(f"size on disk: packed {b['packed'] / 1024:.1f} KiB vs fp16 {b['fp16'] / 1024:.1f} KiB "
          f"({b['fp16'] / b['packed']:.2f}x smaller; lm_head and embeddings stay full precision)")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2))


def _ms(values: list[float], pct: bool = False) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f}% ± {100 * sd:.1f}" if pct else f"{mean:.4f} ± {sd:.4f}"


if __name__ == "__main__":
    main()
