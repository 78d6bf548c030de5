"""Monte-Carlo estimates with standard errors, used to check the closed forms
(docs/THEORY.md §8). All in float64; the samples are iid replicates along axis 0.

- :func:`mean_se`: sample mean, ``se = s/√n``.
- :func:`variance_se`: unbiased sample variance ``s²`` and its standard error from the
  sample fourth central moment, ``Var(s²) = μ₄/n − σ⁴(n − 3)/(n(n − 1))`` (for normal
  data this is ``2σ⁴/(n − 1)``).
- :func:`covariance_se`: sample covariance and the se of the mean of the centred
  products.
- :func:`ratio_se`: ratio of two means with the delta-method se.
- :func:`z_score`: ``(estimate − prediction)/se``; a closed form passes a check when
  ``|z| < 4`` (or the bound the test states).
- :func:`agreement`: the z-score of a comparison, printed as one ``AGREEMENT`` line
  (``pytest -s ... | grep AGREEMENT`` lists the measured agreement of every check).
"""
from __future__ import annotations

import numpy as np

__all__ = ["mean_se", "variance_se", "covariance_se", "ratio_se", "z_score", "agreement"]


def _samples(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples along axis 0, got shape {x.shape}")
    return x


def mean_se(x):
    """``(mean, se)`` along axis 0 with ``se = s/√n``."""
    x = _samples(x)
    n = x.shape[0]
    return x.mean(axis=0), x.std(axis=0, ddof=1) / np.sqrt(n)


def variance_se(x):
    """``(s², se(s²))`` along axis 0 (unbiased ``s²``; se from the sample 4th moment)."""
    x = _samples(x)
    n = x.shape[0]
    d = x - x.mean(axis=0)
    s2 = (d**2).sum(axis=0) / (n - 1)
    m4 = (d**4).mean(axis=0)
    var = m4 / n - s2**2 * (n - 3) / (n * (n - 1))
    return s2, np.sqrt(np.maximum(var, 0.0))


def covariance_se(x, y):
    """``(cov, se)`` of the sample covariance of paired samples along axis 0."""
    x, y = _samples(x), _samples(y)
    n = x.shape[0]
    p = (x - x.mean(axis=0)) * (y - y.mean(axis=0))
    return p.sum(axis=0) / (n - 1), p.std(axis=0, ddof=1) / np.sqrt(n)


def ratio_se(num, den):
    """``(mean(num)/mean(den), se)`` by the delta method on paired samples."""
    num, den = _samples(num), _samples(den)
    n = num.shape[0]
    a, b = num.mean(axis=0), den.mean(axis=0)
    r = a / b
    resid = (num - r * den) / b
    return r, resid.std(axis=0, ddof=1) / np.sqrt(n)


def z_score(estimate, prediction, se):
    """``(estimate − prediction)/se`` elementwise."""
    return (np.asarray(estimate, dtype=np.float64) - np.asarray(prediction, dtype=np.float64)) / np.asarray(se, dtype=np.float64)


def agreement(name: str, prediction, estimate, se) -> float:
    """Largest ``|z|`` of ``(estimate − prediction)/se`` (elementwise), printed as
    ``AGREEMENT <name> pred=… mc=… se=… ratio=… max|z|=…`` (first element shown for arrays)."""
    p = np.asarray(prediction, dtype=np.float64)
    e = np.asarray(estimate, dtype=np.float64)
    s = np.asarray(se, dtype=np.float64)
    z = np.abs(z_score(e, p, s))
    zmax = float(np.max(z))
    i = np.unravel_index(int(np.argmax(z)), z.shape) if z.ndim else ()
    pb, eb, sb = np.broadcast_arrays(p, e, s)
    pv, ev, sv = float(pb[i]), float(eb[i]), float(sb[i])
    ratio = ev / pv if pv != 0 else float("nan")
    print(f"AGREEMENT {name} pred={pv:.6g} mc={ev:.6g} se={sv:.3g} ratio={ratio:.4f} max|z|={zmax:.2f} (n={z.size})")
    return zmax
