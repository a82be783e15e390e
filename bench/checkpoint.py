"""Checkpoint cost side by side: torch.save / torch.load, torch.distributed.checkpoint with
async_save, and gearshift's CheckpointManager synchronous and asynchronous.

Method
------
For each size, one ``LlamaForCausalLM`` built from a config (fp32, untied embeddings) and an
AdamW whose state exists (one step on random gradients), so the checkpoint holds the weights and
both moments: about 12 bytes per parameter. Every method saves that same state to this machine's
disk (a fresh folder under ``--dir``) and loads it back into the same model and optimizer, in
rounds that interleave the methods (rotating their order each round) so that drift in the
machine's speed is shared; the table shows the best round of each. Three times are measured:

* ``blocked``: how long the training loop would wait: the call that saves (for an asynchronous
  save, until it returns);
* ``durable``: from the call until the checkpoint is complete and on disk: for ``torch.save``
  the save plus an ``fsync`` of the file and its folder (HF Trainer and Lightning do not fsync;
  this is the same bytes made durable); for DCP until ``async_save``'s future is done
  (``FileSystemWriter`` fsyncs its files by default); for gearshift until
  ``CheckpointManager.save`` returns or the handle's ``wait()`` does (every file and folder
  fsynced, manifest written, committed, ``latest`` moved, retention applied);
* ``load``: reading it back into the model and optimizer: ``torch.load(weights_only=True)`` +
  ``load_state_dict`` of both; DCP ``load`` into the state dicts + ``load_state_dict``;
  gearshift ``CheckpointManager.load`` (every file's SHA-256 checked against the manifest).

gearshift async is measured in the steady state of a run: one warm-up save first (the first
save of a run serializes into fresh memory, later ones refill that memory in place); the first
save's blocked time is shown as ``first blocked``. Retention keeps one checkpoint, so every
save but the first also deletes the previous one (off the training path when asynchronous).
The files are in the page cache when loaded back, for every method alike.

Ratios are to ``torch.save`` (blocked, durable: to ``torch.save`` + ``fsync``) and to
``torch.load`` + ``load_state_dict``. Goals (issue 16): async blocked <= 0.3x, durable
<= 1.2x, verified load <= 1.2x.

Run ``python bench/checkpoint.py --help``; ``--sizes 50M 500M`` is the issue's pair.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import machine_busy_s, percent
from transformers import LlamaConfig, LlamaForCausalLM

from gearshift.checkpoint import CheckpointManager

SIZES = {  # hidden, layers, intermediate, heads; vocab 32000
    "10M": (256, 2, 688, 4),
    "50M": (512, 8, 1408, 8),
    "150M": (768, 12, 2048, 12),
    "250M": (1024, 12, 2816, 16),
    "500M": (1280, 18, 3456, 20),
}
METHODS = ("torch.save", "dcp async_save", "gearshift sync", "gearshift async")


def build(size: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    hidden, layers, inter, heads = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values()
                     if isinstance(t, torch.Tensor))
    return total


class Methods:
    """Each method's save (blocked, durable) and load, on one model and optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 root: Path) -> None:
        self.model, self.optimizer, self.root = model, optimizer, root
        self.step = 0
        self.managers = {"gearshift sync": CheckpointManager(root / "gs-sync", keep_last=1),
                         "gearshift async": CheckpointManager(root / "gs-async", keep_last=1)}
        self.dcp_error: str | None = None
        self._dcp = self._init_dcp()

    def _init_dcp(self) -> Any:
        try:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp

            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method=f"file://{self.root / 'pg'}",
                                        rank=0, world_size=1)
            return dcp
        except Exception as exc:  # reported in the table, not fatal
            self.dcp_error = f"{type(exc).__name__}: {exc}"
            return None

    def save(self, method: str) -> tuple[float, float]:
        self.step += 1
        start = time.perf_counter()
        if method == "torch.save":
            path = self.root / "torch.pt"
            torch.save({"model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict()}, path)
            blocked = time.perf_counter() - start
            fsync_path(path)
            fsync_path(self.root)
            return blocked, time.perf_counter() - start
        if method == "dcp async_save":
            target = self.root / f"dcp-{self.step}"
            future = self._dcp.async_save({"model": self.model.state_dict(),
                                           "optimizer": self.optimizer.state_dict()},
                                          checkpoint_id=str(target))
            blocked = time.perf_counter() - start
            future.result()
            durable = time.perf_counter() - start
            for old in self.root.glob("dcp-*"):
                if old != target:
                    shutil.rmtree(old)
            return blocked, durable
        manager = self.managers[method]
        result = manager.save(self.step, model=self.model, optimizer=self.optimizer,
                              trainer_state={"step": self.step},
                              asynchronous=method == "gearshift async")
        blocked = time.perf_counter() - start
        if not isinstance(result, Path):
            result.wait()
        return blocked, time.perf_counter() - start

    def load(self, method: str) -> float:
        start = time.perf_counter()
        if method == "torch.save":
            state = torch.load(self.root / "torch.pt", weights_only=True, map_location="cpu")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        elif method == "dcp async_save":
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            self._dcp.load(state, checkpoint_id=str(self.root / f"dcp-{self.step_of('dcp')}"))
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            manager = self.managers[method]
            manager.load(manager.latest(), model=self.model, optimizer=self.optimizer)
        return time.perf_counter() - start

    def step_of(self, prefix: str) -> int:
        return max(int(p.name.split("-")[1]) for p in self.root.glob(f"{prefix}-*"))


def measure(size: str, rounds: int, root: Path, methods: list[str],
            log: Callable[[str], None]) -> dict[str, Any]:
    model, optimizer = build(size)
    params = sum(p.numel() for p in model.parameters())
    nbytes = state_bytes(model, optimizer)
    log(f"{size}: {params / 1e6:.0f}M parameters, {nbytes / 2**30:.2f} GiB of state")
    bench = Methods(model, optimizer, root)
    if bench._dcp is None and "dcp async_save" in methods:
        methods = [m for m in methods if m != "dcp async_save"]
    first_blocked = None
    if "gearshift async" in methods:
        first_blocked, _ = bench.save("gearshift async")  # the run's first save
    best: dict[str, dict[str, float]] = {m: {} for m in methods}
    busy0, wall0 = machine_busy_s(), time.perf_counter()
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for method in order:
            try:
                blocked, durable = bench.save(method)
                load = bench.load(method)
            except Exception as exc:
                if method != "dcp async_save":
                    raise
                bench.dcp_error = f"{type(exc).__name__}: {exc}"
                methods = [m for m in methods if m != method]
                best.pop(method, None)
                log(f"  {method}: does not run here ({bench.dcp_error})")
                continue
            gc.collect()
            row = best[method]
            for key, value in (("blocked", blocked), ("durable", durable), ("load", load)):
                row[key] = min(row.get(key, float("inf")), value)
            log(f"  round {r + 1} {method:16s} blocked {blocked:7.3f}s  durable "
                f"{durable:7.3f}s  load {load:7.3f}s")
    busy1, wall1 = machine_busy_s(), time.perf_counter()
    other = None
    if busy0 is not None and busy1 is not None:
        cpus = os.cpu_count() or 1
        other = max(0.0, (busy1 - busy0) / ((wall1 - wall0) * cpus))
    result = {"size": size, "parameters": params, "state_bytes": nbytes, "rounds": rounds,
              "best": best, "gearshift_async_first_blocked": first_blocked,
              "dcp_error": bench.dcp_error, "machine_busy": other}
    del bench, model, optimizer
    gc.collect()
    return result


def print_table(result: dict[str, Any]) -> None:
    best = result["best"]
    base = best["torch.save"]
    print(f"\n{result['size']} ({result['parameters'] / 1e6:.0f}M parameters, "
          f"{result['state_bytes'] / 2**30:.2f} GiB of state, best of {result['rounds']}, "
          f"machine busy {percent(result['machine_busy'])})")
    print(f"{'method':18s} {'blocked s':>10s} {'ratio':>7s} {'durable s':>10s} {'ratio':>7s} "
          f"{'load s':>8s} {'ratio':>7s}")
    for method, row in best.items():
        print(f"{method:18s} {row['blocked']:10.3f} {row['blocked'] / base['blocked']:6.2f}x "
              f"{row['durable']:10.3f} {row['durable'] / base['durable']:6.2f}x "
              f"{row['load']:8.3f} {row['load'] / base['load']:6.2f}x")
    if result["gearshift_async_first_blocked"] is not None:
        print(f"gearshift async, first save of a run: blocked "
              f"{result['gearshift_async_first_blocked']:.3f}s")
    if result["dcp_error"]:
        print(f"dcp async_save: not measured ({result['dcp_error']})")
    if "gearshift async" in best:
        g = best["gearshift async"]
        print("goals: async blocked <= 0.3x torch.save: "
              f"{g['blocked'] / base['blocked']:.2f}x; durable <= 1.2x torch.save + fsync: "
              f"{g['durable'] / base['durable']:.2f}x; verified load <= 1.2x torch.load: "
              f"{g['load'] / base['load']:.2f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["50M", "500M"], choices=sorted(SIZES),
                        help="model sizes (default: 50M 500M)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (best is shown)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the checkpoints are written (default: a temporary folder "
                             "on the disk of the current directory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for size in args.sizes:
        root = Path(tempfile.mkdtemp(prefix=f"gs-ckpt-bench-{size}-", dir=args.dir or Path.cwd()))
        try:
            results.append(measure(size, args.rounds, root, list(args.methods),
                                   lambda line: print(line, flush=True)))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print_table(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
