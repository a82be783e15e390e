"""Per-step overhead of ``gearshift.Trainer`` next to a plain loop, HF Trainer and Lightning.

Method
------
Every arm trains the same job in this one process:

* model: a tiny ``LlamaForCausalLM`` (hidden 128, 2 layers, 4 heads, MLP 352, vocab 259),
  rebuilt before every run from the same seed, so every run starts from identical weights;
* data: the CPython reference manual, byte-level tokenized and packed into 128-token
  sequences; every arm sees the same micro-batches in the same order (gearshift draws its
  epoch-0 order as ``randperm(n, seed)``; the other arms get that permutation, truncated to
  ``steps * batch * accumulation`` samples, through a sequential sampler);
* optimisation: AdamW (lr 3e-3, betas 0.9/0.95, no weight decay), batch 8, accumulation 2,
  token-weighted mean next-token cross-entropy, ``clip_grad_norm_`` at 1.0, warmup-cosine LR
  (10% warmup, floor 0.1 x peak) advanced once per optimizer step;
* cadence: each framework logs its loss every 10 steps the way it normally does; no
  evaluation, checkpoints, progress bars or TensorBoard during training.

The arms are (a) ``plain``: a hand-written PyTorch loop; (b) ``gearshift``: ``gearshift.Trainer``
with ``CausalLMLoss``; (c) ``hf``: ``transformers.Trainer``; (d) ``lightning``:
``lightning.Trainer``. Rounds interleave the arms, rotating their order each round, so that
drift in the machine's speed is shared rather than charged to one arm.

Timing: each arm stamps ``time.perf_counter()`` at the end of every optimizer step (plain: in
the loop; gearshift: ``Callback.on_step_end``; HF: ``TrainerCallback.on_step_end``; Lightning:
``on_train_batch_end`` of the micro-batch that completed an optimizer step). Steps/s is
``(steps - skip) / (stamp[steps] - stamp[skip])``: set-up, the first ``skip`` steps (lazy
initialisation) and teardown are excluded, and every interval between two stamps contains one
whole iteration of the framework's loop, logging included. The ratio to ``plain`` is taken
round by round (same minute, same machine state); the table shows its median and range.
On a shared machine a single step can stall for a second when another process takes a core
(worst with several threads), so a second ratio uses each run's *median* step interval,
which such stalls do not move; when the two ratios agree the measurement is clean.
"outside s" is what the step timing leaves out, measured directly: the run's wall time
(trainer construction, first step, teardown, final export) minus the span from the end of
the first step to the end of the last. "eval loss" is the trained model's loss on the same
held-out sequences for every arm; equal values show the arms did the same training.
Frameworks are imported before the first run so that no arm pays for an import.
"other load" is the share of the machine's CPU time during the run that went to processes
other than this one (from ``/proc/stat``, Linux only); above a few percent the run was
disturbed and its numbers deserve a rerun on a quiet machine.

Run ``python bench/overhead.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import machine_busy_s, percent  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from gearshift.data import byte_level_tokenizer, pack_documents, pydoc_topics  # noqa: E402

ARMS: tuple[str, ...] = ("plain", "gearshift", "hf", "lightning")
SEED = 1234
SEQ_LEN = 128
BATCH_SIZE = 8
ACCUMULATE = 2
GRAD_CLIP = 1.0
PEAK_LR = 3e-3
BETAS = (0.9, 0.95)
EPS = 1e-8
MIN_LR_RATIO = 0.1
LOG_EVERY = 10
EVAL_SEQUENCES = 32
DISTURBED = 0.05  # share of the machine's CPU used by other processes that taints a run


@dataclass(frozen=True)
class Job:
    """What every arm trains: the data, the length and the schedule."""

    train: Dataset
    order: list[int]  # sample indices in the order gearshift's stream draws them
    eval_ids: torch.Tensor
    vocab_size: int
    special_ids: dict[str, int]
    steps: int
    warmup: int
    skip: int
    workdir: Path


@dataclass
class RunRecord:
    """One timed run of one arm."""

    arm: str
    round: int
    steps_per_s: float
    median_step_per_s: float
    outside_s: float
    eval_loss: float
    threads: int
    other_load: float | None


Arm = Callable[[Job, LlamaForCausalLM, str, list[float]], None]


# ---------------------------------------------------------------------------- shared pieces


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = MIN_LR_RATIO) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warmup from 0, cosine to ``min_ratio``."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def token_ce_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over targets (the same sum ``CausalLMLoss`` computes)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                           reduction="sum")


def targets_in(input_ids: torch.Tensor) -> int:
    return input_ids.shape[0] * (input_ids.shape[1] - 1)


def build_model(job: Job) -> LlamaForCausalLM:
    """The tiny Llama, initialised from :data:`SEED` (identical weights on every call)."""
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=job.vocab_size, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         attn_implementation="sdpa", **job.special_ids)
    return LlamaForCausalLM(config)


def ordered_loader(job: Job) -> DataLoader:
    """Micro-batches in gearshift's order, for the arms that take a DataLoader."""
    return DataLoader(Subset(job.train, job.order), batch_size=BATCH_SIZE, shuffle=False,
                      num_workers=0)


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=BETAS, eps=EPS,
                             weight_decay=0.0)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, eval_ids: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for ids in eval_ids.split(BATCH_SIZE):
        total += float(token_ce_sum(model(input_ids=ids).logits, ids))
    return total / targets_in(eval_ids)


# ---------------------------------------------------------------------------- the arms


def run_plain(job: Job, model: LlamaForCausalLM, workdir: str, stamps: list[float]) -> None:
    """A hand-written loop: LR from the closed form, token-weighted accumulation, clip, step."""
    model.train()
    optimizer = adamw(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(ordered_loader(job))
    logged: list[float] = []
    for step in range(job.steps):
        lr = PEAK_LR * warmup_cosine(step, job.steps, job.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        window = [next(batches)["input_ids"] for _ in range(ACCUMULATE)]
        units = sum(targets_in(ids) for ids in window)
        step_loss = torch.zeros(())
        for ids in window:
            loss = token_ce_sum(model(input_ids=ids).logits, ids) / units
            loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % LOG_EVERY == 0:
            logged.append(float(step_loss))
        stamps.append(time.perf_counter())


def run_gearshift(job: Job, model: LlamaForCausalLM, workdir: str, stamps: list[float]) -> None:
    """``gearshift.Trainer`` with ``CausalLMLoss``; its run directory lives under ``workdir``."""
    from gearshift import Callback, Trainer
    from gearshift.tasks import CausalLMLoss

    class Clock(Callback):
        def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
            stamps.append(time.perf_counter())

    config = {
        "name": "overhead",
        "seed": SEED,
        "output_dir": workdir,
        "optim": {"name": "adamw", "learning_rate": PEAK_LR, "weight_decay": 0.0,
                  "betas": list(BETAS), "eps": EPS},
        "schedule": {"name": "warmup_cosine", "warmup_steps": job.warmup,
                     "min_lr_ratio": MIN_LR_RATIO, "warmup_start_factor": 0.0,
                     "interval": "step"},
        "training": {"max_steps": job.steps, "batch_size": BATCH_SIZE,
                     "accumulate_grad_batches": ACCUMULATE, "grad_clip": GRAD_CLIP,
                     "precision": "fp32", "eval_every": None, "log_every": LOG_EVERY},
        "checkpoint": {"enabled": False},
        "logging": {"progress_bar": False, "tensorboard": False, "wandb": False},
    }
    trainer = Trainer(model, job.train, config, loss_fn=CausalLMLoss(), eval_data=None,
                      callbacks=[Clock()], run_dir=Path(workdir) / "run")
    trainer.fit()


def run_hf(job: Job, model: LlamaForCausalLM, workdir: str, stamps: list[float]) -> None:
    """``transformers.Trainer`` with a ``compute_loss_func`` normalised by the window's tokens."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([s["input_ids"] for s in samples])
        return {"input_ids": ids, "labels": ids}

    def loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None
                  ) -> torch.Tensor:
        # The Trainer counts the window's targets over labels[..., 1:] for causal LMs.
        return token_ce_sum(outputs.logits, labels) / num_items_in_batch

    args = TrainingArguments(
        output_dir=workdir, max_steps=job.steps, per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=ACCUMULATE, learning_rate=PEAK_LR, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=GRAD_CLIP, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO}, warmup_steps=job.warmup,
        logging_strategy="steps", logging_steps=LOG_EVERY, save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, use_cpu=True, seed=SEED,
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Subset(job.train, job.order),
                      data_collator=collate, compute_loss_func=loss_func, callbacks=[Clock()])
    trainer.train()


def run_lightning(job: Job, model: LlamaForCausalLM, workdir: str, stamps: list[float]) -> None:
    """``lightning.Trainer``; a LambdaLR stepped per optimizer step gives the same schedule."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            ids = batch["input_ids"]
            # Lightning divides by accumulate_grad_batches; every micro-batch holds the same
            # number of targets, so this equals token weighting over the window.
            loss = token_ce_sum(self.model(input_ids=ids).logits, ids) / targets_in(ids)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            optimizer = adamw(self.model)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: warmup_cosine(step, job.steps, job.warmup))
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.last_step = 0

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step > self.last_step:
                self.last_step = trainer.global_step
                stamps.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=job.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=ACCUMULATE, gradient_clip_val=GRAD_CLIP,
        gradient_clip_algorithm="norm", log_every_n_steps=LOG_EVERY, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=workdir, callbacks=[Clock()],
    )
    trainer.fit(Module(), train_dataloaders=ordered_loader(job))


RUNNERS: dict[str, Arm] = {"plain": run_plain, "gearshift": run_gearshift, "hf": run_hf,
                           "lightning": run_lightning}


# ---------------------------------------------------------------------------- harness


def prepare_job(steps: int, skip: int, workdir: Path) -> Job:
    """Pack the corpus once; fix the data order every arm will follow."""
    from datasets.utils import logging as ds_logging

    ds_logging.disable_progress_bar()
    tokenizer = byte_level_tokenizer()
    packed = pack_documents(pydoc_topics(), tokenizer, seq_len=SEQ_LEN, eval_fraction=0.05,
                            max_eval_sequences=EVAL_SEQUENCES, seed=SEED)
    needed = steps * BATCH_SIZE * ACCUMULATE
    if needed > len(packed.train):
        raise SystemExit(f"--steps {steps} needs {needed} sequences; the corpus has "
                         f"{len(packed.train)}. Lower --steps")
    # gearshift's BatchStream orders epoch 0 as randperm(n, seed + 0).
    order = torch.randperm(len(packed.train), generator=torch.Generator().manual_seed(SEED))
    assert packed.eval is not None
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return Job(train=packed.train, order=order[:needed].tolist(), eval_ids=packed.eval.input_ids,
               vocab_size=len(tokenizer), special_ids=special, steps=steps,
               warmup=max(1, steps // 10), skip=skip, workdir=workdir)


def check_schedules_agree(job: Job) -> None:
    """Fail early if the three schedule implementations would give different LRs."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    from gearshift.schedules import build_schedule

    ours = build_schedule("warmup_cosine", total_steps=job.steps, warmup_steps=job.warmup,
                          min_lr_ratio=MIN_LR_RATIO, warmup_start_factor=0.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = get_cosine_with_min_lr_schedule_with_warmup(opt, job.warmup, job.steps,
                                                     min_lr_rate=MIN_LR_RATIO)
    for step in range(job.steps):
        expected = warmup_cosine(step, job.steps, job.warmup)
        got = (ours.multiplier(step), hf.lr_lambdas[0](step))
        if any(abs(g - expected) > 1e-9 for g in got):
            raise SystemExit(f"schedules disagree at step {step}: {expected} vs {got}")






def time_run(arm: str, rnd: int, job: Job, threads: int) -> RunRecord:
    """Train one fresh model with one arm and measure its steady-state step rate."""
    torch.set_num_threads(threads)
    gc.collect()
    model = build_model(job)
    stamps: list[float] = []
    # Every arm's chatter (HF's printed logs, Lightning's banners, save_pretrained's progress
    # bar) goes to one buffer, shown only if the run fails.
    chatter = io.StringIO()
    with tempfile.TemporaryDirectory(dir=job.workdir, prefix=f"{arm}-") as workdir:
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                busy0, own0 = machine_busy_s(), time.process_time()
                start = time.perf_counter()
                RUNNERS[arm](job, model, workdir, stamps)
                wall = time.perf_counter() - start
                busy1, own1 = machine_busy_s(), time.process_time()
        except BaseException:
            sys.stderr.write(chatter.getvalue())
            raise
    if len(stamps) != job.steps:
        raise RuntimeError(f"{arm}: {len(stamps)} step stamps for {job.steps} steps")
    other_load = None
    if busy0 is not None and busy1 is not None:
        others = (busy1 - busy0) - (own1 - own0)
        other_load = max(0.0, others / (wall * (os.cpu_count() or 1)))
    timed = stamps[job.skip - 1 :]
    intervals = [b - a for a, b in zip(timed, timed[1:], strict=False)]
    return RunRecord(arm=arm, round=rnd, steps_per_s=len(intervals) / (timed[-1] - timed[0]),
                     median_step_per_s=1.0 / statistics.median(intervals),
                     outside_s=wall - (stamps[-1] - stamps[0]),
                     eval_loss=eval_loss(model, job.eval_ids), threads=torch.get_num_threads(),
                     other_load=other_load)


def summarize(records: list[RunRecord], arms: list[str]) -> list[dict[str, Any]]:
    """Median steps/s per arm and its ratio to the plain loop, round by round."""
    by_round = {(r.arm, r.round): r for r in records}
    rounds = sorted({r.round for r in records})
    rows = []
    for arm in arms:
        mine = [r for r in records if r.arm == arm]
        row: dict[str, Any] = {
            "arm": arm,
            "steps_per_s": statistics.median(r.steps_per_s for r in mine),
            "outside_s": statistics.median(r.outside_s for r in mine),
            "eval_loss": statistics.median(r.eval_loss for r in mine),
        }
        if "plain" in arms:
            ratios = [by_round[arm, k].steps_per_s / by_round["plain", k].steps_per_s
                      for k in rounds]
            step_ratios = [by_round[arm, k].median_step_per_s
                           / by_round["plain", k].median_step_per_s for k in rounds]
            row.update(ratio=statistics.median(ratios), ratio_min=min(ratios),
                       ratio_max=max(ratios), median_step_ratio=statistics.median(step_ratios))
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, job: Job,
                params: int) -> None:
    print(f"\n{job.steps} optimizer steps x {args.rounds} rounds; batch {BATCH_SIZE} x accumulation "
          f"{ACCUMULATE} x {SEQ_LEN} tokens; Llama {params / 1e6:.2f}M params; "
          f"torch {torch.__version__}, torch threads {args.threads}")
    print(f"steps/s = median over rounds of steps {job.skip + 1}..{job.steps} per second, from "
          f"per-step end stamps (set-up, first {job.skip} steps and teardown excluded)")
    print("ratio = median over rounds of (arm steps/s) / (plain steps/s) in the same round; "
          "higher is faster\n")
    print(f"{'arm':<10} {'steps/s':>8} {'ratio':>7} {'ratio range':>12} {'median-step':>12} "
          f"{'outside s':>10} {'eval loss':>10}")
    for row in rows:
        if "ratio" in row:
            ratio = f"{row['ratio']:.2f}x"
            spread = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
            step_ratio = f"{row['median_step_ratio']:.2f}x"
        else:
            ratio = spread = step_ratio = "-"
        print(f"{row['arm']:<10} {row['steps_per_s']:>8.2f} {ratio:>7} {spread:>12} "
              f"{step_ratio:>12} {row['outside_s']:>10.2f} {row['eval_loss']:>10.4f}")
    print("\nmedian-step = the same ratio from each run's median step time (immune to stalls "
          "caused by other processes)\noutside s = wall time of a run not inside the timed "
          "steps: construction, first step, teardown, export\neval loss = trained model on the "
          f"same {EVAL_SEQUENCES} held-out sequences (equal = same training)")


FRAMEWORK_MODULES: dict[str, tuple[str, ...]] = {
    "plain": (),
    "gearshift": ("gearshift", "gearshift.tasks", "accelerate"),
    "hf": ("transformers.trainer", "accelerate"),
    "lightning": ("lightning",),
}


def import_frameworks(arms: list[str]) -> None:
    """Import every selected framework now, so that no timed run pays for an import."""
    for arm in arms:
        for module in FRAMEWORK_MODULES[arm]:
            importlib.import_module(module)


def quiet_frameworks() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*num_workers.*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all arms")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="which arms to run (ratios need plain)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for all")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    problems = []
    if args.rounds < 1:
        problems.append("--rounds must be >= 1")
    if args.threads < 1:
        problems.append("--threads must be >= 1")
    if args.skip < 1:
        problems.append("--skip must be >= 1")
    if args.steps < args.skip + 2:
        problems.append(f"--steps must be >= --skip + 2 ({args.skip + 2})")
    if problems:
        parser.error("; ".join(problems))
    args.arms = [a for a in ARMS if a in args.arms]  # canonical order, duplicates dropped
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Importing Lightning resets its loggers' levels, so quieten after the imports.
    import_frameworks(args.arms)
    quiet_frameworks()
    torch.set_num_threads(args.threads)
    records: list[RunRecord] = []
    with tempfile.TemporaryDirectory(prefix="gearshift-overhead-") as tmp:
        job = prepare_job(args.steps, args.skip, Path(tmp))
        check_schedules_agree(job)
        params = sum(p.numel() for p in build_model(job).parameters())
        for rnd in range(args.rounds):
            shift = rnd % len(args.arms)
            for arm in args.arms[shift:] + args.arms[:shift]:
                record = time_run(arm, rnd, job, args.threads)
                records.append(record)
                print(f"round {rnd} {arm:<10} {record.steps_per_s:7.2f} steps/s  median step "
                      f"{record.median_step_per_s:7.2f}/s  outside {record.outside_s:5.2f} s  "
                      f"eval loss {record.eval_loss:.4f}  other load "
                      f"{percent(record.other_load)}", file=sys.stderr, flush=True)
    if any(r.threads != args.threads for r in records):
        print(f"warning: torch thread count changed during a run: "
              f"{sorted({(r.arm, r.threads) for r in records})}", file=sys.stderr)
    rows = summarize(records, args.arms)
    print_table(rows, args, job, params)
    loads = [r.other_load for r in records if r.other_load is not None]
    if loads:
        print(f"other load = CPU used by other processes during the runs: median "
              f"{percent(statistics.median(loads))}, max {percent(max(loads))}")
        if max(loads) > DISTURBED:
            print(f"warning: other processes used over {percent(DISTURBED)} of the CPU during "
                  "some runs; trust the median-step column, or rerun on a quiet machine")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "settings": {"steps": args.steps, "rounds": args.rounds, "threads": args.threads,
                         "skip": args.skip, "batch_size": BATCH_SIZE, "accumulate": ACCUMULATE,
                         "seq_len": SEQ_LEN, "warmup": job.warmup, "params": params,
                         "torch": torch.__version__},
            "summary": rows,
            "runs": [asdict(r) for r in records],
        }, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
