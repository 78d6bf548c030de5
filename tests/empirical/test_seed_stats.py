"""Intervals over training seeds (a study's unit of replication, 4 in the default grid)."""
import math

import numpy as np
import pytest
from scipy import stats as st

from noiseprop.empirical.studies.seed_stats import bootstrap_seed_means, bootstrap_seed_t


def _coverage_ok(hits, reps, p=0.95, k=3.0):
    se = math.sqrt(p * (1 - p) / reps)
    return abs(hits / reps - p) <= k * se, (hits / reps, p, k * se)


def test_bootstrap_seed_t_covers_at_four_seeds_where_the_percentile_interval_does_not():
    """The mean of 4 normal seeds: the t-bootstrap interval covers 95% (within 3 s.e.
    of the coverage estimate); the percentile interval covers about 80% and fails."""
    rng = np.random.default_rng(3)
    reps, t_hits, pct_hits = 600, 0, 0
    first = lambda m: m[:, 0]  # noqa: E731
    for r in range(reps):
        M = rng.normal(size=(4, 3))
        out = bootstrap_seed_t(M, first, float(M[:, 0].mean()), n_resamples=1000, seed=r)
        t_hits += out["ci_low"] <= 0.0 <= out["ci_high"]
        lo, hi, _ = bootstrap_seed_means(M, first, n_resamples=1000, seed=r)
        pct_hits += lo <= 0.0 <= hi
    ok, info = _coverage_ok(t_hits, reps)
    assert ok, info
    assert not _coverage_ok(pct_hits, reps)[0]


def test_bootstrap_seed_t_is_the_student_t_interval_for_a_mean():
    rng = np.random.default_rng(4)
    M = rng.normal(size=(5, 2))
    est = float(M[:, 1].mean())
    out = bootstrap_seed_t(M, lambda m: m[:, 1], est, n_resamples=20000, seed=0)
    s = M[:, 1].std(ddof=1) / math.sqrt(5)
    # the bootstrap's standard error carries Monte-Carlo error ~ 1/sqrt(2·20000) relative
    assert abs(out["se"] / s - 1) < 4 / math.sqrt(2 * 20000)
    assert out["df"] == 4
    assert math.isclose(out["p"], 2 * st.t.sf(abs(est) / out["se"], 4))
    h = st.t.ppf(0.975, 4) * out["se"]
    assert math.isclose(out["ci_low"], est - h) and math.isclose(out["ci_high"], est + h)


def test_bootstrap_seed_t_with_too_few_seeds_is_undefined():
    out = bootstrap_seed_t(np.ones((1, 3)), lambda m: m[:, 0], 1.0)
    assert math.isnan(out["ci_low"]) and math.isnan(out["p"])


def test_seed_summary_intervals_within_the_values_a_column_takes():
    """Two seeds at 0.97 and 0.99: the t-interval (1 degree of freedom) is
    0.98 ± 12.706·0.01 = [0.853, 1.107]; an accuracy's is cut at 1, an unbounded column's
    kept; a loss's is cut at 0."""
    import pandas as pd
    from scipy import stats

    from noiseprop.empirical.studies.seed_stats import seed_summary

    f = pd.DataFrame(dict(g=["a", "a"], seed=[0, 1], clean_accuracy=[0.97, 0.99], eta10=[0.97, 0.99],
                          auc=[0.01, 0.03], clean_loss=[0.01, 0.03]))
    s = seed_summary(f, ["g"], ["clean_accuracy", "eta10", "auc", "clean_loss"]).iloc[0]
    h = stats.t.ppf(0.975, 1) * 0.01
    assert s.clean_accuracy_ci_low == pytest.approx(0.98 - h) and s.clean_accuracy_ci_high == 1.0
    assert s.eta10_ci_low == pytest.approx(0.98 - h) and s.eta10_ci_high == pytest.approx(0.98 + h)
    assert s.auc_ci_low == 0.0 and s.auc_ci_high == pytest.approx(0.02 + h)
    assert s.clean_loss_ci_low == 0.0 and s.clean_loss_ci_high == pytest.approx(0.02 + h)
