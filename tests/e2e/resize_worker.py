"""One process of the resume-on-another-number-of-processes test (alone, or one rank of torchrun).

Usage: resize_worker.py CONFIG.json RUN_DIR OUT_PREFIX STOP_AT [resume]
Records, per optimizer step, the training samples this process fed the model, the LR, the phase
and the controller's steps in phase; stops gracefully (checkpointing) after STOP_AT steps (0: run
to the end).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

import gearshift as gs
from gearshift.config import load_config
from gearshift.tasks import TASKS
from gearshift.transforms import build_transforms


class Recorded:
    """The training set, noting every sample index read."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        self.read.append(int(index))
        return self.data[index]


class Record(gs.Callback):
    def __init__(self, data: Recorded, stop_at: int) -> None:
        self.data = data
        self.stop_at = stop_at
        self.steps: list[dict] = []

    def on_step_end(self, trainer: gs.Trainer, metrics: dict) -> None:
        controller = trainer.dynamics.controller
        self.steps.append({"step": trainer.step, "ids": list(self.data.read), "lr": metrics["lr"],
                           "loss": metrics["loss"], "phase": metrics.get("phase"),
                           "in_phase": controller.steps_in_phase if controller else None,
                           "world": trainer.accelerator.num_processes})
        self.data.read.clear()
        if trainer.step == self.stop_at:
            trainer.should_stop = True


def main() -> None:
    cfg = load_config(json.loads(Path(sys.argv[1]).read_text()))
    run_dir, out, stop_at = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    resume = len(sys.argv) > 5
    task = TASKS[cfg.task](cfg)
    parts = task.build()
    data = Recorded(parts.train_data)
    record = Record(data, stop_at)
    trainer = gs.Trainer(parts.model, data, cfg, eval_data=parts.eval_data, callbacks=[record],
                         run_dir=run_dir, resume_from=run_dir if resume else None,
                         tokenizer=parts.tokenizer, collate_fn=parts.collate_fn, task=task,
                         transforms=build_transforms(cfg))
    trainer.fit()
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(f"{out}-rank{rank}.json").write_text(json.dumps(record.steps))
    if dist.is_initialized():  # leave together, so no rank sees its peer vanish mid-collective
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
