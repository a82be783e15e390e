"""Per-step cost of the phase controller and the gradient-sign tracker next to the training step.

Method
------
For each model size and each setting, one model is trained for a few optimizer steps in this
process, and every step is cut into the pieces the trainer runs (``gearshift.Trainer.train_step``,
in its order)::

    forward + backward          -> step time
    GradientSignTracker.update  -> tracker time   (between backward and the optimizer step)
    AdamW step + zero_grad      -> step time
    PhaseScheduler.update       -> controller time (after the step, with its loss and stability)

Each piece is stamped with ``time.perf_counter_ns`` (after a device synchronisation off the CPU),
so the tracker always sees the real gradients of the step it is timed next to, and machine
drift hits the step and its overhead alike. The overhead of a step is
``(tracker + controller) / step``; the table shows medians over the timed steps (a step that a
competing process stalls moves a median little), and the ratio is taken step by step.

* models: ``LlamaForCausalLM`` configurations from about 1M to 100M parameters (``--sizes``),
  each built from the same seed, fp32, SDPA attention;
* data: a fixed pool of random token sequences (``--batch`` x ``--seq-len`` tokens per step,
  the same for every size), cycled so the loss falls and gradients are real;
* settings: ``full`` — full fine-tuning, every parameter trainable and tracked (the tracker's
  worst case); ``lora`` — ``gearshift.lora.attach_lora`` with ``r=8`` on the attention and MLP
  projections, only the adapter parameters trainable and tracked (the intended use);
* optimiser: ``torch.optim.AdamW`` (lr 1e-4) over the trainable parameters;
* controller: ``build_phase_scheduler`` with gearshift's schema, three phases
  ``foundation → balance → emphasis``, window 200, every criterion on (stability, CV, R²) and
  ``min_steps`` high enough that no transition happens while timing (a transition is a one-off);
  before training it is fed ``window`` synthetic losses so that its window is full, as in a
  long run;
* warm-up: the first ``--warmup`` steps (lazy AdamW state, the tracker's first update, which
  only allocates its sign buffers) are run the same way but not timed;
* timed steps: ``--steps``, fewer when a step is slow — a row stops after ``--budget-s`` seconds
  of training, but never below ``--min-steps`` steps.

"bytes/elem" is the tracker's :attr:`~gearshift.signals.GradientSignTracker.bytes_per_element`
after the run: the bytes held by its sign buffers over the tracked elements (transient tensors
inside ``update`` are not counted). Targets from the issue: overhead ≤ 1% of the step time and
≤ 1 byte per tracked element; the last two columns say whether each row meets them.

The step time scales with the tokens per step while the tracker's cost does not, so the
overhead shown for these small CPU batches is an upper bound for a real run with larger
batches (or gradient accumulation) on the same hardware. Absolute times depend on the machine
and its load: only the ratios are meant to be compared. "other load" is the share of the
machine's CPU time during a row that went to other processes (``/proc/stat``, Linux only);
above a few percent, rerun on a quiet machine. The default is one torch thread: with as many
threads as cores, one competing process can stall a step for seconds, while both the step and
the tracker's element-wise passes scale with threads alike; use ``--threads`` on a quiet
machine.

The controller's cost in the table is what it costs right after a training step (cold caches,
as in a real loop). A footnote adds its mean over a long run of back-to-back synthetic updates
(warm caches, the window's periodic re-summing included): the pure cost of the statistics.

Run ``python bench/controller.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402
from machine import machine_busy_s, percent  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from gearshift.lora import attach_lora  # noqa: E402
from gearshift.phases import PhaseScheduler, build_phase_scheduler  # noqa: E402
from gearshift.signals import GradientSignTracker  # noqa: E402

SEED = 1234
LR = 1e-4
LORA_R = 8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DATA_POOL = 4  # distinct batches, cycled
MAX_OVERHEAD = 0.01  # target: controller + tracker <= 1% of the step
MAX_BYTES_PER_ELEMENT = 1.0  # target: <= 1 byte of tracker memory per tracked element
DISTURBED = 0.05  # share of the machine's CPU used by other processes that taints a row
SETTINGS: tuple[str, ...] = ("full", "lora")

CONTROLLER_CONFIG: dict[str, Any] = {
    "enabled": True,
    "window": 200,
    "patience": 10,
    "phases": [
        {"name": name, "alpha": alpha, "min_steps": 1_000_000,
         "exit": {"relative_improvement_below": 1e-3, "min_gradient_stability": 0.5,
                  "max_cv": 0.5, "min_r2": 0.1}}
        for name, alpha in (("foundation", 8), ("balance", 16), ("emphasis", 32))
    ],
}


@dataclass(frozen=True)
class ModelSize:
    """A ``LlamaForCausalLM`` shape (untied embeddings, as many KV heads as query heads)."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int

    def config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.heads,
                           max_position_embeddings=2048, tie_word_embeddings=False,
                           attn_implementation="sdpa")


SIZES: dict[str, ModelSize] = {s.name: s for s in (
    ModelSize("1M", hidden=128, layers=4, heads=4, intermediate=384, vocab=1024),
    ModelSize("10M", hidden=256, layers=10, heads=4, intermediate=768, vocab=4096),
    ModelSize("30M", hidden=512, layers=6, heads=8, intermediate=1536, vocab=8192),
    ModelSize("100M", hidden=768, layers=12, heads=12, intermediate=2048, vocab=8192),
)}


@dataclass
class Row:
    """One timed (size, setting) run; times in seconds, one entry per timed step."""

    size: str
    setting: str
    params: int
    tracked: int
    tensors: int
    step_s: list[float] = field(default_factory=list)
    tracker_s: list[float] = field(default_factory=list)
    controller_s: list[float] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    bytes_per_element: float = 0.0
    other_load: float | None = None
    threads: int = 0

    @property
    def overhead(self) -> float:
        """Median over steps of (tracker + controller) / step."""
        return statistics.median((t + c) / s for s, t, c in
                                 zip(self.step_s, self.tracker_s, self.controller_s, strict=True))

    @property
    def meets_time(self) -> bool:
        return self.overhead <= MAX_OVERHEAD

    @property
    def meets_memory(self) -> bool:
        return self.bytes_per_element <= MAX_BYTES_PER_ELEMENT

    def summary(self) -> dict[str, Any]:
        return {
            "size": self.size, "setting": self.setting, "params": self.params,
            "tracked": self.tracked, "tensors": self.tensors, "steps": len(self.step_s),
            "step_ms": 1e3 * statistics.median(self.step_s),
            "tracker_us": 1e6 * statistics.median(self.tracker_s),
            "controller_us": 1e6 * statistics.median(self.controller_s),
            "overhead": self.overhead, "bytes_per_element": self.bytes_per_element,
            "meets_time": self.meets_time, "meets_memory": self.meets_memory,
            "other_load": self.other_load,
        }


# ---------------------------------------------------------------------------- pieces


def build_model(size: ModelSize, setting: str) -> nn.Module:
    """The model of ``size`` from :data:`SEED`; with ``lora``, wrapped by ``attach_lora``."""
    torch.manual_seed(SEED)
    model: nn.Module = LlamaForCausalLM(size.config())
    if setting == "lora":
        model = attach_lora(model, r=LORA_R, alpha=16, target_modules=list(LORA_TARGETS))
    return model


def make_batches(vocab: int, batch: int, seq_len: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)
            for _ in range(DATA_POOL)]


def build_controller() -> PhaseScheduler:
    """The controller, its window already full of (synthetic, slowly falling) losses."""
    controller = build_phase_scheduler(CONTROLLER_CONFIG, rank=LORA_R)
    assert controller is not None
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(CONTROLLER_CONFIG["window"], generator=generator).tolist()
    for step, eps in enumerate(noise):
        controller.update(step, loss=5.0 - 1e-3 * step + 0.05 * eps, gradient_stability=0.6)
    return controller


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None






# ---------------------------------------------------------------------------- one row


def time_row(size: ModelSize, setting: str, args: argparse.Namespace) -> Row:
    """Train one model of ``size`` in ``setting``; time step, tracker and controller per step."""
    device = torch.device(args.device)
    sync = synchronizer(device)
    gc.collect()
    model = build_model(size, setting).to(device)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=LR)
    tracker = GradientSignTracker(named)
    controller = build_controller()
    batches = make_batches(size.vocab, args.batch, args.seq_len, device)
    row = Row(size=size.name, setting=setting,
              params=sum(p.numel() for p in model.parameters()),
              tracked=sum(p.numel() for p in params), tensors=len(params))

    ns = time.perf_counter_ns
    next_step = CONTROLLER_CONFIG["window"]
    busy0, own0, start = machine_busy_s(), time.process_time(), time.perf_counter()
    timed_since: float | None = None
    i = 0
    while True:
        ids = batches[i % DATA_POOL]
        sync()
        t0 = ns()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        step_loss = float(loss.detach())
        sync()
        t1 = ns()
        stability = tracker.update()
        t2 = ns()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = ns()
        controller.update(next_step, loss=step_loss, gradient_stability=stability)
        t4 = ns()
        next_step += 1
        i += 1
        if i <= args.warmup:
            if i == args.warmup:
                timed_since = time.perf_counter()
            continue
        if stability is None:
            raise RuntimeError("the tracker compared nothing in a timed step")
        row.step_s.append(((t1 - t0) + (t3 - t2)) * 1e-9)
        row.tracker_s.append((t2 - t1) * 1e-9)
        row.controller_s.append((t4 - t3) * 1e-9)
        row.stability.append(stability)
        row.losses.append(step_loss)
        n = len(row.step_s)
        assert timed_since is not None
        if n >= args.steps or (n >= args.min_steps
                               and time.perf_counter() - timed_since >= args.budget_s):
            break
    wall = time.perf_counter() - start
    busy1, own1 = machine_busy_s(), time.process_time()
    if busy0 is not None and busy1 is not None:
        others = (busy1 - busy0) - (own1 - own0)
        row.other_load = max(0.0, others / (wall * (os.cpu_count() or 1)))
    row.bytes_per_element = tracker.bytes_per_element
    row.threads = torch.get_num_threads()
    if controller.transition_history:
        raise RuntimeError("the controller made a transition while timing; raise min_steps")
    del model, optimizer, tracker, batches
    gc.collect()
    return row


def controller_amortized_us(updates: int) -> float:
    """Mean µs per ``PhaseScheduler.update`` over a long synthetic run (rebases included)."""
    controller = build_controller()
    generator = torch.Generator().manual_seed(SEED + 1)
    noise = torch.randn(updates, generator=generator).tolist()
    first = CONTROLLER_CONFIG["window"]
    start = time.perf_counter_ns()
    for k, eps in enumerate(noise):
        controller.update(first + k, loss=4.0 + 0.05 * eps, gradient_stability=0.6)
    return (time.perf_counter_ns() - start) * 1e-3 / updates


# ---------------------------------------------------------------------------- report


def print_table(rows: list[Row], args: argparse.Namespace, amortized_us: float) -> None:
    print(f"\nbatch {args.batch} x {args.seq_len} tokens per step, fp32, AdamW, device "
          f"{args.device}; torch {torch.__version__}, torch threads {args.threads}")
    print("step = forward + backward + AdamW step + zero_grad; tracker = "
          "GradientSignTracker.update; controller = PhaseScheduler.update; all three timed in "
          "every step, medians over the timed steps")
    print(f"targets: overhead = (tracker + controller) / step <= {100 * MAX_OVERHEAD:g}%, "
          f"tracker memory <= {MAX_BYTES_PER_ELEMENT:g} byte per tracked element\n")
    head = (f"{'size':<5} {'setting':<7} {'params':>9} {'tracked':>9} {'tensors':>7} {'steps':>5} "
            f"{'step ms':>9} {'tracker µs':>11} {'ctrl µs':>8} {'overhead':>9} "
            f"{'B/elem':>7} {'≤1%':>4} {'≤1B':>4} {'load':>5}")
    print(head)
    print("-" * len(head))
    for row in rows:
        s = row.summary()
        print(f"{s['size']:<5} {s['setting']:<7} {s['params'] / 1e6:>8.2f}M "
              f"{_count(s['tracked']):>9} {s['tensors']:>7} {s['steps']:>5} {s['step_ms']:>9.1f} "
              f"{s['tracker_us']:>11.0f} {s['controller_us']:>8.0f} "
              f"{100 * s['overhead']:>8.3f}% {s['bytes_per_element']:>7.2f} "
              f"{'yes' if s['meets_time'] else 'NO':>4} {'yes' if s['meets_memory'] else 'NO':>4} "
              f"{percent(s['other_load']):>5}")
    print(f"\ncontroller alone, {args.controller_updates} back-to-back synthetic updates (window "
          f"full, re-summing included, warm caches): {amortized_us:.1f} µs per update on average")
    print("params = all parameters; tracked / tensors = elements / parameter tensors the "
          "tracker follows (the trainable ones); B/elem = tracker sign-buffer bytes / tracked "
          "elements")
    print("overhead = median over steps of (tracker + controller) / step; load = CPU used by "
          "other processes during the row")
    print("the step time grows with the tokens per step (--batch x --seq-len), the tracker's and "
          "controller's do not: larger batches lower the overhead in proportion")
    loads = [r.other_load for r in rows if r.other_load is not None]
    if loads and max(loads) > DISTURBED:
        print(f"warning: other processes used over {percent(DISTURBED)} of the CPU during some "
              "rows; rerun on a quiet machine before trusting the step times")
    failed = [f"{r.size}/{r.setting}" for r in rows if not (r.meets_time and r.meets_memory)]
    print("all rows meet both targets" if not failed
          else f"rows missing a target: {', '.join(failed)}")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k"


# ---------------------------------------------------------------------------- main


def quiet_frameworks() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="peft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        help="model sizes to run")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                        help="full fine-tuning (everything tracked) and/or LoRA (adapters only)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row, at most")
    parser.add_argument("--min-steps", type=int, default=5,
                        help="timed steps per row, at least (whatever --budget-s says)")
    parser.add_argument("--budget-s", type=float, default=15.0,
                        help="stop timing a row after this many seconds of training")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (>= 2: the tracker's first update compares "
                             "nothing)")
    parser.add_argument("--controller-updates", type=int, default=5000,
                        help="synthetic controller updates for the amortized cost")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1 is robust on a shared machine)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    problems = []
    for name in ("batch", "seq_len", "steps", "min_steps", "threads", "controller_updates"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 2:
        problems.append("--warmup must be >= 2")
    if args.min_steps > args.steps:
        problems.append("--min-steps must be <= --steps")
    if args.budget_s <= 0:
        problems.append("--budget-s must be > 0")
    if problems:
        parser.error("; ".join(problems))
    args.sizes = [s for s in SIZES if s in args.sizes]  # canonical order, duplicates dropped
    args.settings = [s for s in SETTINGS if s in args.settings]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_frameworks()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    for name in args.sizes:
        for setting in args.settings:
            chatter = io.StringIO()  # PEFT / transformers notices, shown only on failure
            try:
                with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                    row = time_row(SIZES[name], setting, args)
            except BaseException:
                sys.stderr.write(chatter.getvalue())
                raise
            rows.append(row)
            s = row.summary()
            print(f"{name:<5} {setting:<5} {s['steps']:>3} steps  step {s['step_ms']:8.1f} ms  "
                  f"tracker {s['tracker_us']:9.0f} µs  controller {s['controller_us']:5.0f} µs  "
                  f"other load {percent(s['other_load'])}", file=sys.stderr, flush=True)
    amortized_us = controller_amortized_us(args.controller_updates)
    if any(r.threads != args.threads for r in rows):
        print(f"warning: torch thread count changed during a row: "
              f"{sorted({(r.size, r.setting, r.threads) for r in rows})}", file=sys.stderr)
    print_table(rows, args, amortized_us)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "settings": {"batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
                         "min_steps": args.min_steps, "budget_s": args.budget_s,
                         "warmup": args.warmup, "threads": args.threads, "device": args.device,
                         "lora_r": LORA_R, "lora_targets": list(LORA_TARGETS),
                         "controller": CONTROLLER_CONFIG, "torch": torch.__version__,
                         "sizes": {n: asdict(SIZES[n]) for n in args.sizes}},
            "controller_amortized_us": amortized_us,
            "summary": [r.summary() for r in rows],
            "rows": [asdict(r) for r in rows],
        }, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
