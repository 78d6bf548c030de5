"""Statistics over training seeds (the unit of replication)."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..stats import mean_ci

__all__ = ["seed_paired", "seed_matrix", "bootstrap_seed_means", "seed_summary"]


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


def warnings_ignored():
    cm = warnings.catch_warnings()

    class _Ctx:
        def __enter__(self):
            cm.__enter__()
            warnings.simplefilter("ignore", RuntimeWarning)

        def __exit__(self, *exc):
            return cm.__exit__(*exc)

    return _Ctx()


def seed_summary(frame: pd.DataFrame, by: Sequence[str], cols: Sequence[str], confidence: float = 0.95) -> pd.DataFrame:
    """Mean over training seeds of each column in ``cols`` per group ``by``, with the
    Student-t interval across seeds (``<col>_ci_low``/``_ci_high``) and ``n_seeds``."""
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
            row[c], row[f"{c}_ci_low"], row[f"{c}_ci_high"] = m, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)
