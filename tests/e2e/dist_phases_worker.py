"""One rank of the two-process phase-consistency test (run by torchrun from the test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

import gearshift as gs


class Record(gs.Callback):
    def __init__(self) -> None:
        self.alphas: list[dict] = []
        self.losses: list[float] = []

    def on_step_end(self, trainer: gs.Trainer, metrics: dict) -> None:
        self.losses.append(trainer.local_loss)
        self.alphas.append({k: v for k, v in metrics.items() if k.startswith("alpha/")})


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rec = Record()
    trainer_holder: dict = {}

    class Keep(gs.Callback):
        def on_train_start(self, trainer: gs.Trainer) -> None:
            trainer_holder["t"] = trainer

    gs.train(cfg, callbacks=[rec, Keep()])
    trainer = trainer_holder["t"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    controller = trainer.dynamics.controller
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "transitions": controller.transition_history,
        "alphas": rec.alphas,
        "local_losses": rec.losses,
    }))
    if dist.is_initialized():  # leave together, so no rank sees its peer vanish mid-collective
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
