"""Whether the loss *level* is stable: the spread of consecutive block means.

The per-step coefficient of variation says how noisy each step is, not whether training is
stable: a diffusion or RL loss with per-step CV near 1 can sit on a perfectly steady level. So
the controller's ``cv`` check looks at the means of 10 consecutive blocks of ``window // 10``
losses (the last window of the phase): their standard deviation over their mean is small on a
steady level however noisy each step is (it shrinks like ``1/sqrt(block)``), and large when the
level jumps or swings — a run that diverges for a while, or a loss that oscillates.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from gearshift.errors import CheckpointError

BLOCKS = 10


class LevelBlocks:
    """Means of the last :data:`BLOCKS` complete blocks of ``max(1, window // BLOCKS)`` losses.

    Args:
        window: The controller's statistics window.

    Example:
        >>> level = LevelBlocks(20)
        >>> for v in [1.0, 3.0] * 10:
        ...     level.add(v)
        >>> level.cv()
        0.0
    """

    __slots__ = ("block", "_sum", "_n", "_means", "_cv")

    def __init__(self, window: int) -> None:
        self.block = max(1, window // BLOCKS)
        self.clear()

    def clear(self) -> None:
        """Forget every loss."""
        self._sum = 0.0
        self._n = 0
        self._means: deque[float] = deque(maxlen=BLOCKS)
        self._cv: float | None = None

    def add(self, value: float) -> None:
        """Add one loss; a completed block updates :meth:`cv` (O(BLOCKS) once per block)."""
        self._sum += value
        self._n += 1
        if self._n == self.block:
            self._means.append(self._sum / self.block)
            self._sum, self._n = 0.0, 0
            self._cv = _cv(self._means)

    def cv(self) -> float | None:
        """Standard deviation of the block means over their mean (``None``: < 2 blocks or mean 0)."""
        return self._cv

    def __len__(self) -> int:
        return len(self._means)

    def state(self) -> dict[str, Any]:
        """JSON-safe state (floats round-trip exactly)."""
        return {"block": self.block, "sum": self._sum, "n": self._n, "means": list(self._means)}

    @classmethod
    def from_state(cls, state: Any, window: int, where: str) -> LevelBlocks:
        """Rebuild from :meth:`state`; a different block size (window changed) starts afresh."""
        out = cls(window)
        if not isinstance(state, dict):
            raise CheckpointError(f"phase state {where} must be a dict, got {type(state).__name__}")
        if state.get("block") != out.block:
            return out
        means = state.get("means")
        if not isinstance(means, list) or not all(_finite(m) for m in means):
            raise CheckpointError(f"phase state {where}.means must be a list of finite numbers")
        total, n = state.get("sum"), state.get("n")
        if not _finite(total) or isinstance(n, bool) or not isinstance(n, int) \
                or not 0 <= n < out.block:
            raise CheckpointError(f"phase state {where} has a malformed running block")
        out._sum, out._n = float(total), n
        out._means.extend(float(m) for m in means[-BLOCKS:])
        out._cv = _cv(out._means)
        return out


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _cv(means: deque[float]) -> float | None:
    k = len(means)
    if k < 2:
        return None
    mean = math.fsum(means) / k
    if mean == 0.0:
        return None
    sd = math.sqrt(math.fsum((m - mean) ** 2 for m in means) / (k - 1))
    return sd / abs(mean)
