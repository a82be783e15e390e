"""Windowed loss statistics in O(1) amortized time per sample, with exact, resumable state.

:class:`RollingFit` keeps the last ``capacity`` ``(step, loss)`` samples in a ring buffer and
running sums of ``x, x², y, y², xy`` for an ordinary-least-squares line through them. ``x`` is
the optimizer step relative to an origin ``x0`` and ``y`` the loss relative to a reference ``y0``;
every ``capacity`` samples both are re-based (``x0`` = oldest step, ``y0`` = window mean) and the
sums recomputed from the buffer (``math.fsum``), so float drift never accumulates and the sums
stay small and centred — the cost of that is O(capacity) once per ``capacity`` samples.

:class:`PhaseTrend` is the same regression over *every* sample of the phase, by Welford-style
online updates (no buffer), and :class:`RollingMean` a windowed mean (gradient stability).

All three have ``state()`` / ``from_state()`` that round-trip every float exactly through JSON, so
a resumed controller computes bit-identical statistics.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Any

from gearshift.errors import CheckpointError


@dataclass(frozen=True)
class Fit:
    """One least-squares fit of loss on step.

    Attributes:
        n: Samples in the fit.
        mean: Mean loss.
        slope: Loss change per optimizer step.
        se: Standard error of ``slope`` (0 for a perfect line).
        r2: Coefficient of determination, ``None`` when the losses are all equal.
        cv: Sample standard deviation over ``|mean|``, ``None`` when the mean is 0.
        noise: Standard deviation of the residuals around the line (the per-step noise).
    """

    n: int
    mean: float
    slope: float
    se: float
    r2: float | None
    cv: float | None
    noise: float = 0.0


@lru_cache(maxsize=1024)  # the fixed windows' df recur every update; the phase's grows
def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t distribution with ``df`` degrees of freedom (no SciPy).

    Exact (bisection on the closed-form CDF, cached) for ``df < 30``; the Cornish-Fisher
    expansion to ``1/df⁴`` above, whose error there is below 1e-5.

    Example:
        >>> round(t_quantile(0.95, 10), 4)
        1.8125
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df < 30:
        return _t_quantile_exact(p, df)
    z = NormalDist().inv_cdf(p)
    z2 = z * z
    g1 = (z2 + 1) * z / 4
    g2 = ((5 * z2 + 16) * z2 + 3) * z / 96
    g3 = (((3 * z2 + 19) * z2 + 17) * z2 - 15) * z / 384
    g4 = ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) * z / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def _t_cdf(t: float, df: int) -> float:
    # Abramowitz & Stegun 26.7.3 / 26.7.4: P(|T| < t) as a finite series for integer df.
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:
        term, total = c, c if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= c * c * (k - 1) / k
            total += term
        a = 2.0 / math.pi * (theta + s * total)
    else:
        term = total = 1.0
        for k in range(2, df - 1, 2):
            term *= c * c * (k - 1) / k
            total += term
        a = s * total
    return 0.5 * (1.0 + a)


@lru_cache(maxsize=256)
def _t_quantile_exact(p: float, df: int) -> float:
    sign = 1.0
    if p < 0.5:
        p, sign = 1.0 - p, -1.0
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return sign * 0.5 * (lo + hi)


def _fit(n: int, cxx: float, cxy: float, cyy: float, mean: float) -> Fit | None:
    if n < 3 or cxx <= 0.0:
        return None
    cyy = max(cyy, 0.0)
    slope = cxy / cxx
    sse = max(cyy - slope * cxy, 0.0)
    noise = math.sqrt(sse / (n - 2))
    se = noise / math.sqrt(cxx)
    r2 = min(max(slope * cxy / cyy, 0.0), 1.0) if cyy > 0.0 else None
    cv = math.sqrt(cyy / (n - 1)) / abs(mean) if mean != 0.0 else None
    return Fit(n=n, mean=mean, slope=slope, se=se, r2=r2, cv=cv, noise=noise)


class RollingFit:
    """Least-squares line through the last ``capacity`` ``(step, loss)`` samples.

    Args:
        capacity: Samples kept (the statistics window), ``>= 3``.

    Example:
        >>> fit = RollingFit(3)
        >>> for step, loss in enumerate([5.0, 4.0, 3.0, 2.0]):
        ...     fit.add(step, loss)
        >>> fit.fit().slope, len(fit)
        (-1.0, 3)
    """

    __slots__ = ("capacity", "_xs", "_ys", "_x0", "_y0", "_sx", "_sxx", "_sy", "_syy", "_sxy",
                 "_since_rebase")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        """Forget every sample."""
        self._xs: deque[int] = deque()
        self._ys: deque[float] = deque()
        self._x0 = 0
        self._y0 = 0.0
        self._sx = self._sxx = 0  # exact Python ints: x are integer steps
        self._sy = self._syy = self._sxy = 0.0
        self._since_rebase = 0

    def __len__(self) -> int:
        return len(self._ys)

    def add(self, x: int, y: float) -> None:
        """Append one sample, dropping the oldest when full."""
        if not self._ys:
            self._x0, self._y0 = x, y
        if len(self._ys) == self.capacity:
            dx, dy = self._xs.popleft() - self._x0, self._ys.popleft() - self._y0
            self._sx -= dx
            self._sxx -= dx * dx
            self._sy -= dy
            self._syy -= dy * dy
            self._sxy -= dx * dy
        self._xs.append(x)
        self._ys.append(y)
        dx, dy = x - self._x0, y - self._y0
        self._sx += dx
        self._sxx += dx * dx
        self._sy += dy
        self._syy += dy * dy
        self._sxy += dx * dy
        self._since_rebase += 1
        if self._since_rebase >= self.capacity:
            self._rebase()

    def _rebase(self) -> None:
        # Centre on the current window and recompute every sum exactly: bounded drift, O(1)
        # amortized because it runs once per `capacity` samples.
        self._x0 = self._xs[0]
        self._y0 = math.fsum(self._ys) / len(self._ys)
        dxs = [x - self._x0 for x in self._xs]
        dys = [y - self._y0 for y in self._ys]
        self._sx = sum(dxs)
        self._sxx = sum(d * d for d in dxs)
        self._sy = math.fsum(dys)
        self._syy = math.fsum(d * d for d in dys)
        self._sxy = math.fsum(a * b for a, b in zip(dxs, dys, strict=True))
        self._since_rebase = 0

    def fit(self) -> Fit | None:
        """The fit over the buffer, or ``None`` with fewer than 3 samples."""
        n = len(self._ys)
        if n < 3:
            return None
        my = self._sy / n
        cxx = (n * self._sxx - self._sx * self._sx) / n
        return _fit(n, cxx, self._sxy - self._sx * my, self._syy - self._sy * my, self._y0 + my)

    def mean(self) -> float | None:
        """Mean of the buffered losses (``None`` when empty)."""
        return self._y0 + self._sy / len(self._ys) if self._ys else None

    def samples(self) -> list[tuple[int, float]]:
        """The buffered ``(step, loss)`` pairs, oldest first."""
        return list(zip(self._xs, self._ys, strict=True))

    def state(self) -> dict[str, Any]:
        """JSON-safe state: the buffer and every running sum, exactly."""
        return {"capacity": self.capacity, "steps": list(self._xs), "losses": list(self._ys),
                "x0": self._x0, "y0": self._y0, "sx": self._sx, "sxx": self._sxx, "sy": self._sy,
                "syy": self._syy, "sxy": self._sxy, "since_rebase": self._since_rebase}

    @classmethod
    def from_state(cls, state: Any, capacity: int, where: str) -> tuple[RollingFit, bool]:
        """Rebuild from :meth:`state`; returns ``(fit, resized)``.

        When the saved capacity differs from ``capacity`` (the config's window changed), the
        newest ``capacity`` samples are kept and the sums recomputed, and ``resized`` is True.
        """
        _require_dict(state, where)
        steps = _int_list(state.get("steps"), f"{where}.steps")
        losses = _float_list(state.get("losses"), f"{where}.losses")
        if len(steps) != len(losses):
            raise CheckpointError(f"phase state {where}: steps and losses differ in length")
        out = cls(capacity)
        if state.get("capacity") != capacity or len(steps) > capacity:
            for x, y in list(zip(steps, losses, strict=True))[-capacity:]:
                out.add(x, y)
            return out, True
        out._xs, out._ys = deque(steps), deque(losses)
        out._x0 = _int(state.get("x0"), f"{where}.x0")
        out._sx = _int(state.get("sx"), f"{where}.sx")
        out._sxx = _int(state.get("sxx"), f"{where}.sxx")
        out._since_rebase = _int(state.get("since_rebase"), f"{where}.since_rebase")
        for key in ("y0", "sy", "syy", "sxy"):
            setattr(out, "_" + key, _float(state.get(key), f"{where}.{key}"))
        return out, False


class PhaseTrend:
    """Least-squares slope over every loss of the phase (online, O(1) memory).

    Used to see a slow, steady rise that no single window can resolve: its standard error
    shrinks like ``n^-1.5`` as the phase goes on.

    Example:
        >>> trend = PhaseTrend()
        >>> for step in range(5):
        ...     trend.add(step, 1.0 + step)
        >>> trend.fit().slope
        1.0
    """

    __slots__ = ("origin", "n", "mean_x", "mean_y", "cxx", "cxy", "cyy")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget every sample."""
        self.origin: int | None = None
        self.n = 0
        self.mean_x = self.mean_y = self.cxx = self.cxy = self.cyy = 0.0

    def add(self, x: int, y: float) -> None:
        """Add one sample (Welford update of the means and co-moments)."""
        if self.origin is None:
            self.origin = x
        xr = float(x - self.origin)
        self.n += 1
        dx, dy = xr - self.mean_x, y - self.mean_y
        self.mean_x += dx / self.n
        self.mean_y += dy / self.n
        self.cxx += dx * (xr - self.mean_x)
        self.cxy += dx * (y - self.mean_y)
        self.cyy += dy * (y - self.mean_y)

    def fit(self) -> Fit | None:
        """The fit over the whole phase, or ``None`` with fewer than 3 samples."""
        return _fit(self.n, self.cxx, self.cxy, self.cyy, self.mean_y)

    def state(self) -> dict[str, Any]:
        """JSON-safe state."""
        return {"origin": self.origin, "n": self.n, "mean_x": self.mean_x,
                "mean_y": self.mean_y, "cxx": self.cxx, "cxy": self.cxy, "cyy": self.cyy}

    @classmethod
    def from_state(cls, state: Any, where: str) -> PhaseTrend:
        """Rebuild from :meth:`state`."""
        _require_dict(state, where)
        out = cls()
        origin = state.get("origin")
        out.origin = None if origin is None else _int(origin, f"{where}.origin")
        out.n = _int(state.get("n"), f"{where}.n")
        for key in ("mean_x", "mean_y", "cxx", "cxy", "cyy"):
            setattr(out, key, _float(state.get(key), f"{where}.{key}"))
        return out


class RollingMean:
    """Mean of the last ``capacity`` values (running sum, re-summed every ``capacity`` adds).

    Example:
        >>> m = RollingMean(2)
        >>> for v in (1.0, 2.0, 4.0):
        ...     m.add(v)
        >>> m.mean(), len(m)
        (3.0, 2)
    """

    __slots__ = ("capacity", "_values", "_total", "_since_resum")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        """Forget every value."""
        self._values: deque[float] = deque()
        self._total = 0.0
        self._since_resum = 0

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: float) -> None:
        """Append one value, dropping the oldest when full."""
        if len(self._values) == self.capacity:
            self._total -= self._values.popleft()
        self._values.append(value)
        self._total += value
        self._since_resum += 1
        if self._since_resum >= self.capacity:
            self._total = math.fsum(self._values)
            self._since_resum = 0

    def mean(self) -> float | None:
        """The mean, or ``None`` when empty."""
        return self._total / len(self._values) if self._values else None

    def state(self) -> dict[str, Any]:
        """JSON-safe state."""
        return {"capacity": self.capacity, "values": list(self._values), "total": self._total,
                "since_resum": self._since_resum}

    @classmethod
    def from_state(cls, state: Any, capacity: int, where: str) -> RollingMean:
        """Rebuild from :meth:`state` (re-summed when the capacity changed)."""
        _require_dict(state, where)
        values = _float_list(state.get("values"), f"{where}.values")
        out = cls(capacity)
        if state.get("capacity") != capacity or len(values) > capacity:
            for v in values[-capacity:]:
                out.add(v)
            return out
        out._values = deque(values)
        out._total = _float(state.get("total"), f"{where}.total")
        out._since_resum = _int(state.get("since_resum"), f"{where}.since_resum")
        return out


# --------------------------------------------------------------------------- state checks


def _require_dict(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise CheckpointError(f"phase state {where} must be a dict, got {type(value).__name__}")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"phase state {where} must be an integer, got {value!r}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"phase state {where} must be a finite number, got {value!r}")
    return float(value)


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"phase state {where} must be a list, got {type(value).__name__}")
    return [_int(v, where) for v in value]


def _float_list(value: Any, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"phase state {where} must be a list, got {type(value).__name__}")
    return [_float(v, where) for v in value]
