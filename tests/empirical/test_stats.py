"""Estimators of empirical/stats.py against independent references and simulations
with known truth. Rates are checked within 4.5 binomial standard errors."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from noiseprop.empirical.stats import (
    bootstrap_ci,
    calibration,
    holm,
    log_variance_bias,
    mean_ci,
    ols_effect,
    paired_effect,
    tost_mean,
    tost_t,
    variance_ci,
    variance_tost,
)


def _rate_ok(rate, p, reps, k=4.5):
    se = math.sqrt(p * (1 - p) / reps)
    return abs(rate - p) <= k * se, (rate, p, k * se)


def test_variance_ci_textbook_values():
    # chi-square table: chi2_{9, 0.975} = 19.023, chi2_{9, 0.025} = 2.700
    lo, hi = variance_ci(1.0, 10, 0.95)
    assert lo == pytest.approx(9 / 19.023, rel=1e-4)
    assert hi == pytest.approx(9 / 2.7004, rel=1e-4)
    lo2, hi2 = variance_ci(np.array([1.0, 4.0]), 10)
    assert lo2[1] == pytest.approx(4 * lo) and hi2[1] == pytest.approx(4 * hi)
    with pytest.raises(ValueError, match="n >= 2"):
        variance_ci(1.0, 1)
    with pytest.raises(ValueError, match="negative"):
        variance_ci(-1.0, 10)


@pytest.mark.parametrize("n", [5, 40])
def test_variance_ci_coverage(n):
    rng = np.random.default_rng(1)
    reps, sigma2 = 4000, 2.5
    x = rng.normal(0, math.sqrt(sigma2), size=(reps, n))
    lo, hi = variance_ci(x.var(axis=1, ddof=1), n, 0.95)
    ok, info = _rate_ok(np.mean((lo <= sigma2) & (sigma2 <= hi)), 0.95, reps)
    assert ok, info


def test_variance_tost_size_and_power():
    rng = np.random.default_rng(2)
    reps, n, m = 3000, 400, 0.10
    ref = 1.0
    # at the margin boundary the test must reject at most alpha of the time
    for true in (1.1, 1 / 1.1):
        s2 = (rng.normal(0, math.sqrt(true), size=(reps, n))).var(axis=1, ddof=1)
        rate = np.mean(variance_tost(s2, n, ref, m)[0] < 0.05)
        assert rate <= 0.05 + 4.5 * math.sqrt(0.05 * 0.95 / reps), rate
    # with many draws the other side is far away and the size is exactly alpha
    n_big = 40_000
    for true in (1.1, 1 / 1.1):
        s2 = true * rng.chisquare(n_big - 1, size=reps) / (n_big - 1)
        ok, info = _rate_ok(np.mean(variance_tost(s2, n_big, ref, m)[0] < 0.05), 0.05, reps)
        assert ok, info
    # a true ratio of 1 with many draws: equivalence is found almost always
    n = 3000
    s2 = rng.chisquare(n - 1, size=reps) / (n - 1)
    assert np.mean(variance_tost(s2, n, ref, m)[0] < 0.05) > 0.95
    # a true ratio of 1.3: never equivalent
    assert np.mean(variance_tost(1.3 * s2, n, ref, m)[0] < 0.05) == 0.0


def test_log_variance_bias_matches_simulation():
    rng = np.random.default_rng(3)
    n, reps = 8, 200_000
    s2 = rng.chisquare(n - 1, size=reps) / (n - 1)
    logs = np.log(s2)
    assert abs(logs.mean() - log_variance_bias(n)) < 4.5 * logs.std() / math.sqrt(reps)


def test_tost_t_equals_statsmodels_ttost_mean():
    rng = np.random.default_rng(4)
    x = rng.normal(0.3, 1.0, size=37)
    p_sm = tost_mean(x, -0.2, 0.9)
    m, se, _ = mean_ci(x)
    p_t = tost_t(m, se, x.size - 1, -0.2, 0.9)
    assert p_t == pytest.approx(p_sm, rel=1e-10)
    with pytest.raises(ValueError, match="low < upp"):
        tost_t(0.0, 1.0, 10, 1.0, 0.0)


def test_tost_mean_size_at_the_bound_and_power():
    rng = np.random.default_rng(5)
    reps, n = 3000, 30
    x = rng.normal(-0.5, 1.0, size=(reps, n))  # true mean exactly at the lower bound
    rate = np.mean([tost_mean(r, -0.5, 0.5)[0] < 0.05 for r in x[:1500]])
    assert rate <= 0.05 + 4.5 * math.sqrt(0.05 * 0.95 / 1500)
    x = rng.normal(0.0, 0.5, size=(300, 100))  # well inside: se 0.05 vs margin 0.5
    assert np.mean([tost_mean(r, -0.5, 0.5)[0] < 0.05 for r in x]) > 0.99
    # constant sample: decided exactly
    assert tost_mean(np.zeros(5), -1, 1)[0] == 0.0
    assert tost_mean(np.full(5, 2.0), -1, 1)[0] == 1.0


def test_bootstrap_ci_coverage_skewed_data():
    rng = np.random.default_rng(6)
    reps, n = 300, 40
    hits = 0
    for r in range(reps):
        x = rng.exponential(1.0, size=n)
        lo, hi = bootstrap_ci(x, np.mean, 0.95, n_resamples=1000, seed=r)
        hits += lo <= 1.0 <= hi
    ok, info = _rate_ok(hits / reps, 0.95, reps)
    assert ok, info


def test_bootstrap_ci_is_seeded_and_handles_constant_data():
    x = np.random.default_rng(7).normal(size=50)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(np.full(10, 0.5)) == (0.5, 0.5)
    with pytest.raises(ValueError, match="two"):
        bootstrap_ci([1.0])


def test_calibration_matches_linregress_and_tests_the_identity():
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 2, size=200)
    y = 0.2 + 0.8 * x + rng.normal(0, 0.2, size=200)
    cal = calibration(y, x)
    ref = st.linregress(x, y)
    t = st.t.ppf(0.975, 198)
    assert cal.slope == pytest.approx(ref.slope, rel=1e-10)
    assert cal.intercept == pytest.approx(ref.intercept, rel=1e-10)
    assert cal.slope_ci[1] - cal.slope == pytest.approx(t * ref.stderr, rel=1e-8)
    # joint F-test of slope 1, intercept 0 from the restricted and full residual sums
    rss_u = np.sum((y - ref.intercept - ref.slope * x) ** 2)
    rss_r = np.sum((y - x) ** 2)
    f = ((rss_r - rss_u) / 2) / (rss_u / 198)
    assert cal.f_stat == pytest.approx(f, rel=1e-8)
    assert cal.f_pvalue == pytest.approx(st.f.sf(f, 2, 198), rel=1e-6)
    assert cal.f_pvalue < 1e-3 and cal.calibrated is False
    # log scale with an offset: log(y) - offset on log(x)
    calog = calibration(np.exp(0.5) * x ** 2, x, log=True, offset=0.5)
    assert calog.slope == pytest.approx(2.0) and calog.intercept == pytest.approx(0.0, abs=1e-10)
    # constant predictions: slope undefined, said so
    c0 = calibration(y, np.ones_like(y))
    assert math.isnan(c0.slope) and "constant" in c0.note


def test_calibration_f_test_size_and_power():
    rng = np.random.default_rng(9)
    reps, n = 600, 50
    rej_null = rej_alt = 0
    for _ in range(reps):
        x = rng.uniform(0, 1, size=n)
        e = rng.normal(0, 0.3, size=n)
        rej_null += calibration(x + e, x).f_pvalue < 0.05
        rej_alt += calibration(1.5 * x + e, x).f_pvalue < 0.05
    ok, info = _rate_ok(rej_null / reps, 0.05, reps)
    assert ok, info
    assert rej_alt / reps > 0.6


def test_calibration_cluster_robust_widens_for_clustered_errors():
    rng = np.random.default_rng(10)
    g = np.repeat(np.arange(30), 10)
    x = np.repeat(rng.uniform(0, 1, 30), 10) + rng.normal(0, 0.05, 300)
    y = x + np.repeat(rng.normal(0, 0.3, 30), 10) + rng.normal(0, 0.05, 300)
    naive, robust = calibration(y, x), calibration(y, x, groups=g)
    assert robust.cov_type == "cluster"
    assert (robust.slope_ci[1] - robust.slope_ci[0]) > 2 * (naive.slope_ci[1] - naive.slope_ci[0])


def test_holm_against_hand_computation():
    adj, rej = holm([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(adj[:4], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adj[4]) and list(rej) == [True, False, False, True, False]


def test_paired_effect_matches_scipy():
    rng = np.random.default_rng(11)
    a = rng.normal(1.0, 1.0, 12)
    b = a - 0.5 + rng.normal(0, 0.3, 12)
    e = paired_effect(a, b)
    ref = st.ttest_rel(a, b)
    d = a - b
    assert e.estimate == pytest.approx(d.mean())
    assert e.p_value == pytest.approx(ref.pvalue)
    assert e.standardized == pytest.approx(d.mean() / d.std(ddof=1))
    assert e.ci_low < e.estimate < e.ci_high
    with pytest.raises(ValueError, match="pairs"):
        paired_effect([1, 2], [1])


def test_ols_effect_with_seed_factor_recovers_a_known_slope():
    rng = np.random.default_rng(12)
    reps, covered = 200, 0
    for _ in range(reps):
        seeds = np.repeat(np.arange(4), 5)
        k = np.tile(np.arange(5), 4)
        y = 0.8 - 0.05 * k + rng.normal(0, 0.1, 4)[seeds] + rng.normal(0, 0.02, 20)
        eff, _ = ols_effect(pd.DataFrame(dict(y=y, k=k, seed=seeds)), "y ~ k + C(seed)", "k")
        covered += eff.ci_low <= -0.05 <= eff.ci_high
    ok, info = _rate_ok(covered / reps, 0.95, reps)
    assert ok, info
    with pytest.raises(ValueError, match="not in the fitted model"):
        ols_effect(pd.DataFrame(dict(y=y, k=k, seed=seeds)), "y ~ k", "z")


def test_kurtosis_df_restores_coverage():
    """Variances of non-normal samples (gamma, excess kurtosis 0.6, about the per-draw
    accuracies'): the chi-square interval on n − 1 degrees of freedom undercovers; on
    kurtosis_df's it covers within 3 binomial s.e. of 95%. Normal samples keep n − 1 on
    average and their coverage."""
    from noiseprop.empirical.stats import kurtosis_df, variance_ci

    rng = np.random.default_rng(0)
    reps, n, k = 4000, 30, 10.0
    se = math.sqrt(0.95 * 0.05 / reps)
    plain = adj = 0
    for _ in range(reps):
        v = rng.gamma(k, 1.0, n)
        s2 = v.var(ddof=1)
        lo, hi = variance_ci(s2, n)
        plain += lo <= k <= hi
        lo, hi = variance_ci(s2, n, df=kurtosis_df(v))
        adj += lo <= k <= hi
    assert plain / reps < 0.95 - 3 * se  # the plain interval's shortfall is real
    assert abs(adj / reps - 0.95) < 3 * se, adj / reps
    assert kurtosis_df(np.ones(5)) == 4 and kurtosis_df([1.0, 2.0, 3.0]) == 2
    norm = [kurtosis_df(rng.normal(size=n)) for _ in range(200)]
    assert n - 1 - 3 < np.mean(norm) <= n - 1
