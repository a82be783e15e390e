"""The training data stream: seeded per-epoch order, accumulation windows, an exact position.

The position is the epoch and how many samples of it were consumed over all processes (with the
micro-batches counted too), and the order of epoch ``e`` is a pure function of ``(seed, e)``.
Restoring the position therefore resumes mid-epoch exactly, without replaying or storing the data
— also with another number of processes: the sample offset is global, so a run checkpointed by N
processes and resumed by M skips no sample and sees none twice in the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate

from gearshift.errors import DataError


@dataclass
class DataPosition:
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of `epoch` already consumed
    sample: int = 0  # samples of `epoch` already consumed, over all processes

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "micro_batch": self.micro_batch, "sample": self.sample}

    def load_state_dict(self, state: dict[str, Any], global_batch: int | None = None) -> None:
        """Restore; a position saved before ``sample`` existed counts ``global_batch`` samples
        per micro-batch (its run's processes and batch size were the same)."""
        self.epoch = int(state["epoch"])
        self.micro_batch = int(state["micro_batch"])
        if "sample" in state:
            self.sample = int(state["sample"])
        else:
            self.sample = self.micro_batch * (global_batch or 0)


class BatchStream:
    """Yields accumulation windows (lists of micro-batches) from a map-style dataset.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__``.
        batch_size: samples per micro-batch on each process.
        accumulate: micro-batches per optimizer step; the last window of an epoch may be shorter.
        seed: the order of epoch ``e`` is ``randperm(n, seed + e)``.
        shuffle: when False the order is ``0..n-1`` every epoch.
        drop_last: drop the short last micro-batch of each epoch.
        rank, world_size: each process takes its own slice of every global micro-batch.
        collate_fn: merges samples into a batch (default: torch's ``default_collate``).
    """

    def __init__(self, dataset: Sequence[Any], *, batch_size: int, accumulate: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, collate_fn: Callable[[list[Any]], Any] | None = None,
                 ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.accumulate = accumulate
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.collate_fn = collate_fn or default_collate
        self.position = DataPosition()
        self._order: torch.Tensor | None = None
        self._order_epoch = -1
        self.global_batch = global_batch = batch_size * world_size
        n = len(dataset)
        self.batches_per_epoch = n // global_batch if drop_last else math.ceil(n / global_batch)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training data holds {n} samples, fewer than one batch of {global_batch}; "
                "lower training.batch_size or add data"
            )

    @property
    def samples_per_epoch(self) -> int:
        """Samples each epoch feeds the model (a short last batch dropped with ``drop_last``)."""
        n = len(self.dataset)
        return self.batches_per_epoch * self.global_batch if self.drop_last else n

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulate)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(n, generator=gen)
            else:
                self._order = torch.arange(n)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def next_window(self) -> tuple[list[Any], bool]:
        """The next accumulation window and whether it ended the epoch (position advances)."""
        order = self._epoch_order(self.position.epoch)
        end = self.samples_per_epoch
        window = []
        # The offset is in samples, not micro-batches: a position saved by another number of
        # processes need not fall on a boundary of this run's global batches.
        while len(window) < self.accumulate and self.position.sample < end:
            start = self.position.sample
            chunk = order[start : min(start + self.global_batch, end)]
            per_rank = math.ceil(len(chunk) / self.world_size)
            mine = chunk[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
            window.append(self.collate_fn([self.dataset[i] for i in mine]))
            self.position.micro_batch += 1
            self.position.sample += len(chunk)
        ended = self.position.sample >= end
        if ended:
            self.position.epoch += 1
            self.position.micro_batch = 0
            self.position.sample = 0
        return window, ended
