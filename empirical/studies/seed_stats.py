"""Statistics over training seeds (the unit of replication)."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..stats import mean_ci

__all__ = ["seed_paired", "seed_matrix", "bootstrap_seed_means", "bootstrap_seed_t", "seed_summary"]


def seed_paired(frame: pd.DataFrame, value: str, factor: str, a, b, keys: Sequence[str] = ("seed",)):
    """Values of ``value`` for levels ``a`` and ``b`` of ``factor``, matched on
    ``keys`` (the training seed): two aligned arrays for a paired test."""
    fa = frame[frame[factor] == a].set_index(list(keys))[value]
    fb = frame[frame[factor] == b].set_index(list(keys))[value]
    idx = fa.index.intersection(fb.index).sort_values()
    return fa.loc[idx].to_numpy(float), fb.loc[idx].to_numpy(float)


def seed_matrix(frame: pd.DataFrame, col: str, level: str) -> tuple[list, np.ndarray]:
    """``(levels, M)`` with ``M[s, j]`` the mean of ``col`` for seed ``s`` (sorted) at
    level ``j`` of ``level`` (NaN where a seed lacks a level)."""
    piv = frame.pivot_table(index="seed", columns=level, values=col, aggfunc="mean", dropna=False)
    return list(piv.columns), piv.sort_index().to_numpy(float)


def bootstrap_seed_means(M: np.ndarray, stat: Callable[[np.ndarray], np.ndarray], n_resamples: int = 2000,
                         seed: int = 0, confidence: float = 0.95) -> tuple[float, float, np.ndarray]:
    """Percentile interval of ``stat`` over resamples of the training seeds, for
    statistics of the per-level means: each resample draws the rows (seeds) of ``M``
    with replacement and averages them per level; ``stat`` maps the ``[R, levels]``
    array of resampled means to ``R`` values (vectorised)."""
    rng = np.random.default_rng(seed)
    S = M.shape[0]
    idx = rng.integers(0, S, size=(int(n_resamples), S))
    with np.errstate(all="ignore"), warnings_ignored():
        means = np.nanmean(M[idx], axis=1)
        vals = np.asarray(stat(means), float)
    ok = vals[np.isfinite(vals)]
    a = (1 - confidence) / 2
    if ok.size < 0.5 * n_resamples:
        return float("nan"), float("nan"), vals
    return float(np.quantile(ok, a)), float(np.quantile(ok, 1 - a)), vals


def bootstrap_seed_t(M: np.ndarray, stat: Callable[[np.ndarray], np.ndarray], estimate: float,
                     n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Student-t interval and two-sided test of a statistic of the per-level seed
    means, its standard error from the bootstrap over seeds of
    :func:`bootstrap_seed_means`: ``se = sd*(stat)·√(S/(S−1))`` over ``S`` seeds,
    ``df = S − 1``, interval ``estimate ± t_{S−1}·se``, ``p`` of ``estimate/se``.

    The resampling keeps what the statistic does to the seeds (a maximum re-selected
    in every resample); the ``√(S/(S−1))`` and Student-t quantile give it the width a
    handful of seeds calls for. For the mean of one level it is the Student-t interval
    (the bootstrap's spread of a mean is ``s·√((S−1)/S)/√S``). The percentile interval
    of :func:`bootstrap_seed_means` is too narrow at a study's few seeds: with 4 it
    covered the mean of normal data 80% of the time for a nominal 95%
    (``tests/empirical/test_seed_stats.py``).

    Returns ``{"ci_low", "ci_high", "p", "se", "df", "values"}`` (NaN where fewer than
    half the resamples give a finite value, or with fewer than two seeds)."""
    from scipy import stats as st

    _, _, vals = bootstrap_seed_means(M, stat, n_resamples=n_resamples, seed=seed, confidence=confidence)
    ok = vals[np.isfinite(vals)]
    S = int(M.shape[0])
    nan = float("nan")
    out = {"ci_low": nan, "ci_high": nan, "p": nan, "se": nan, "df": float(S - 1), "values": vals}
    if S < 2 or ok.size < 0.5 * n_resamples or not np.isfinite(estimate):
        return out
    se = float(ok.std(ddof=1) * np.sqrt(S / (S - 1)))
    h = float(st.t.ppf(0.5 + confidence / 2, S - 1)) * se
    if se > 0:
        p = float(2 * st.t.sf(abs(estimate) / se, S - 1))
    else:  # every resample agrees: the sign is certain only if the estimate is not 0
        p = 0.0 if estimate != 0 else 1.0
    out.update(ci_low=float(estimate - h), ci_high=float(estimate + h), p=p, se=se)
    return out


def warnings_ignored():
    cm = warnings.catch_warnings()

    class _Ctx:
        def __enter__(self):
            cm.__enter__()
            warnings.simplefilter("ignore", RuntimeWarning)

        def __exit__(self, *exc):
            return cm.__exit__(*exc)

    return _Ctx()


#: The values a summarised column can take, where bounded: fractions of inputs
#: (accuracies and their means over levels) in [0, 1]; cross-entropy losses, the
#: normalised robustness (a ratio of accuracies) and the noise level of a 10-point drop
#: at or above 0. Their seed intervals are cut to these ranges.
COLUMN_RANGES = {**{c: (0.0, 1.0) for c in ("clean_accuracy", "accuracy", "pred_accuracy", "auc", "pred_auc")},
                 **{c: (0.0, np.inf) for c in ("clean_loss", "noise_loss", "loss", "robustness", "pred_robustness",
                                               "eta10", "pred_eta10")}}


def seed_summary(frame: pd.DataFrame, by: Sequence[str], cols: Sequence[str], confidence: float = 0.95) -> pd.DataFrame:
    """Mean over training seeds of each column in ``cols`` per group ``by``, with the
    Student-t interval across seeds (``<col>_ci_low``/``_ci_high``) and ``n_seeds``.
    For an accuracy or a loss (:data:`COLUMN_RANGES`) the interval is intersected with
    the values the quantity can take: with few seeds the t-interval's half-width can
    exceed the distance to a bound (two seeds at 0.97 and 0.99 give [0.85, 1.11]).
    The intersection keeps every value the interval covered that the quantity can take,
    so its coverage is the t-interval's."""
    rows = []
    for key, d in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n_seeds"] = int(d["seed"].nunique())
        for c in cols:
            v = d[c].to_numpy(float)
            v = v[np.isfinite(v)]
            if v.size == 0:
                row[c], row[f"{c}_ci_low"], row[f"{c}_ci_high"] = np.nan, np.nan, np.nan
                continue
            m, _, (lo, hi) = mean_ci(v, confidence)
            if c in COLUMN_RANGES and np.isfinite(lo):
                lo, hi = max(lo, COLUMN_RANGES[c][0]), min(hi, COLUMN_RANGES[c][1])
            row[c], row[f"{c}_ci_low"], row[f"{c}_ci_high"] = m, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)
