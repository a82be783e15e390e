"""The statistics of a comparison: an arm over its seeds, and an arm against the control.

Means with a Student-t 95% interval over seeds, the difference to the control with a
bootstrap 95% interval (``scipy.stats.bootstrap``, a fixed generator so the same runs give the
same numbers), Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``), and a one-word
verdict that needs both to agree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

#: The verdicts, in the words of ``stats.json``.
BETTER, WORSE, UNCLEAR = "better", "worse", "no clear difference"
#: Significance level of the Welch test and the coverage of every interval.
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


def describe(values: Sequence[float]) -> dict[str, Any]:
    """``n``, ``mean``, sample ``std`` and the t-based ``ci95`` of finite ``values``.

    ``std`` and ``ci95`` are None with fewer than two values; ``mean`` is None with none.

    Example:
        >>> d = describe([1.0, 2.0, 3.0])
        >>> d["mean"], d["std"], [round(x, 4) for x in d["ci95"]]
        (2.0, 1.0, [-0.4841, 4.4841])
    """
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def bootstrap_difference(arm: Sequence[float], control: Sequence[float]
                         ) -> list[float] | None:
    """95% percentile-bootstrap interval of ``mean(arm) − mean(control)`` (each resampled on
    its own); None unless both have two or more values."""
    a, c = np.asarray(arm, dtype=float), np.asarray(control, dtype=float)
    if a.size < 2 or c.size < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical values: a degenerate, still valid, interval
        result = sps.bootstrap(
            (a, c), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            vectorized=True, paired=False, n_resamples=BOOTSTRAP_RESAMPLES,
            confidence_level=1 - ALPHA, method="percentile",
            rng=np.random.default_rng(BOOTSTRAP_SEED))
    low, high = result.confidence_interval
    return [float(low), float(high)]


def welch_p_value(arm: Sequence[float], control: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test; None with fewer than two values in either, or
    when both have no spread at all (the test is undefined)."""
    if len(arm) < 2 or len(control) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(sps.ttest_ind(arm, control, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def verdict(difference: float | None, ci: list[float] | None, p: float | None, *,
            maximize: bool) -> str:
    """``better`` / ``worse`` when the bootstrap interval excludes 0 *and* Welch's p < 0.05,
    else ``no clear difference``.

    Example:
        >>> verdict(-0.5, [-0.8, -0.2], 0.01, maximize=False)
        'better'
        >>> verdict(-0.5, [-0.8, 0.1], 0.01, maximize=False)
        'no clear difference'
    """
    if difference is None or ci is None or p is None or p >= ALPHA:
        return UNCLEAR
    if ci[0] <= 0.0 <= ci[1]:
        return UNCLEAR
    improved = difference > 0 if maximize else difference < 0
    return BETTER if improved else WORSE


def against_control(arm: Sequence[float], control: Sequence[float], *,
                    maximize: bool) -> dict[str, Any]:
    """The difference of the final metric to the control: mean, interval, p-value, verdict."""
    a = [v for v in arm if math.isfinite(v)]
    c = [v for v in control if math.isfinite(v)]
    difference = float(np.mean(a) - np.mean(c)) if a and c else None
    ci = bootstrap_difference(a, c)
    p = welch_p_value(a, c)
    return {"difference": difference, "ci95": ci, "p_value": p,
            "verdict": verdict(difference, ci, p, maximize=maximize)}
