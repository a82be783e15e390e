"""Synthetic loss curves with the noise real training has, to test a phase configuration.

A controller is only as good as the losses it is judged on. These are the shapes and noises the
controller's acceptance tests and ``bench/phases.py`` use, and that a user can feed a
:class:`~gearshift.phases.PhaseScheduler` to see when their settings would transition:

- ``gauss``: multiplicative Gaussian noise, ``level · (1 + cv · z)`` — language-model losses at
  small batch (per-step CV 0.1–0.3).
- ``lognormal``: ``level · exp(s·z − s²/2)`` with ``s² = log(1 + cv²)``: mean ``level``, CV
  ``cv``, a heavy right tail — the loss of a diffusion model at a random timestep.
- ``chi2``: ``level · χ²_k / k`` with ``k = 2 / cv²`` (CV 1: an exponential distribution) —
  squared-error losses of a few effective dimensions.

Example:
    >>> losses = make_curve("flat", 400, noise="lognormal", cv=1.0, seed=0)
    >>> len(losses), round(sum(losses) / len(losses), 1)
    (400, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

NOISES = ("gauss", "lognormal", "chi2")


def shape(kind: str, n: int, rate: float = 0.0, scale: float = 300.0) -> np.ndarray:
    """The noise-free curve: ``flat`` (1), ``fall`` (``exp(-rate·s)``, a relative fall of
    ``rate`` per step), ``rise`` (``exp(rate·s)``) or ``bend`` (``1 + 5·exp(-s/scale)``: a steep
    fall that flattens)."""
    s = np.arange(n, dtype=np.float64)
    shapes: dict[str, Callable[[], np.ndarray]] = {
        "flat": lambda: np.ones(n), "fall": lambda: np.exp(-rate * s),
        "rise": lambda: np.exp(rate * s), "bend": lambda: 1.0 + 5.0 * np.exp(-s / scale)}
    if kind not in shapes:
        raise ValueError(f"unknown curve shape {kind!r}; valid: {', '.join(shapes)}")
    return shapes[kind]()


def noise_factors(noise: str, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positive (except ``gauss``) multiplicative factors of mean 1 and CV ``cv``."""
    if noise == "gauss":
        return 1.0 + cv * rng.standard_normal(n)
    if noise == "lognormal":
        s = math.sqrt(math.log1p(cv * cv))
        return np.exp(s * rng.standard_normal(n) - s * s / 2.0)
    if noise == "chi2":
        k = 2.0 / (cv * cv)
        return rng.chisquare(k, n) / k
    raise ValueError(f"unknown noise {noise!r}; valid: {', '.join(NOISES)}")


def make_curve(kind: str, n: int, *, noise: str = "gauss", cv: float = 0.0, seed: int = 0,
               rate: float = 0.0, scale: float = 300.0) -> list[float]:
    """A loss curve: :func:`shape` times :func:`noise_factors`, as plain floats."""
    base = shape(kind, n, rate=rate, scale=scale)
    if cv == 0.0:
        return base.tolist()
    return (base * noise_factors(noise, cv, n, np.random.default_rng(seed))).tolist()
