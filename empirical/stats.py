"""Basic statistics shared by the Monte-Carlo engine and the reports (THEORY.md §8).

All in float64. The unit of replication is one noise draw (every test input shares it).
"""
from __future__ import annotations

import numpy as np
from scipy import stats as _st

__all__ = ["mean_ci", "welford_update"]


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, tuple[float, float]]:
    """Mean, standard error and Student-t interval ``x̄ ± t_{n−1} s/√n`` over draws.

    With fewer than two values the standard error is undefined: ``nan`` and an
    interval of ``(nan, nan)``. When all values are equal the interval collapses onto
    the mean (the sample carries no spread to widen it).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    m = float(v.mean())
    if n < 2:
        return m, float("nan"), (float("nan"), float("nan"))
    se = float(v.std(ddof=1) / np.sqrt(n))
    h = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return m, se, (m - h, m + h)


def welford_update(count: int, mean, m2, value):
    """One step of Welford's streaming mean/variance (in place on ``mean`` and ``m2``).

    ``count`` is the number of values *including* ``value``; the sample variance is
    ``m2 / (count − 1)``. Works on numpy arrays and torch tensors alike.
    """
    delta = value - mean
    mean += delta / count
    m2 += delta * (value - mean)
    return mean, m2
