"""Evaluation: the loop side of a task's ``evaluate`` (batches, memory, ranks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from gearshift.train import setup
from gearshift.train.recovery import Recovery
from gearshift.train.stream import BatchStream
from gearshift.train.task import Task


@dataclass
class Evaluator:
    """Runs a task's :meth:`~gearshift.train.task.Task.evaluate` with the loop's machinery.

    Args:
        model: The (prepared) model to evaluate.
        task: Whose loss and evaluation are used.
        accelerator: Devices and ranks.
        batch_size: Samples per evaluation batch on each process.
        collate_fn: Merges samples into a batch.
        recovery: Shrinks the batch after an out-of-memory error.
    """

    model: nn.Module
    task: Task
    accelerator: Accelerator
    batch_size: int
    collate_fn: Callable[[list[Any]], Any] | None
    recovery: Recovery

    def __call__(self, eval_data: Sequence[Any] | None) -> dict[str, float]:
        """The task's evaluation of ``eval_data`` ({} without data); the model is left in
        training mode."""
        if eval_data is None or len(eval_data) == 0:
            return {}
        self.model.eval()
        try:
            with torch.no_grad():
                return self.task.evaluate(self.model, eval_data, self)
        finally:
            self.model.train()

    def totals(self, eval_data: Sequence[Any]) -> tuple[float, int, dict[str, float]]:
        """Summed loss, units and summed extra metrics over ``eval_data`` on every rank."""
        acc = self.accelerator
        stream = BatchStream(eval_data, batch_size=self.batch_size, shuffle=False,
                             rank=acc.process_index, world_size=acc.num_processes,
                             collate_fn=self.collate_fn)
        total = torch.zeros((), device=acc.device, dtype=torch.float64)
        units = 0
        sums: dict[str, torch.Tensor] = {}
        for _ in range(stream.batches_per_epoch):
            (cpu_batch,), _ = stream.next_window()
            units += self.task.units(cpu_batch)
            part = self.recovery.retry_eval(lambda b=cpu_batch: self._summed(b, sums), cpu_batch)
            total += part
        if acc.num_processes > 1:
            total = acc.reduce(total, "sum")
            units = int(acc.reduce(torch.tensor(units, device=acc.device), "sum"))
            sums = {k: acc.reduce(v, "sum") for k, v in sums.items()}
        return float(total), units, {k: float(v) for k, v in sums.items()}

    def _summed(self, cpu_batch: Any, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        outs = [self.task.loss(self.model, setup.to_device(piece, self.accelerator.device))
                for piece in self.recovery.pieces(cpu_batch)]
        # Extra metrics are added only once the whole batch fits (a retried batch counts once).
        for out in outs:
            for key, value in out.metrics.items():
                value = torch.as_tensor(value, dtype=torch.float64).to(self.accelerator.device)
                sums[key] = sums[key] + value if key in sums else value
        return sum(out.loss.double() for out in outs)  # type: ignore[return-value]
