"""Statistics shared by the Monte-Carlo engine, the comparisons and the studies
(docs/THEORY.md §8).

All in float64. The unit of replication of a Monte-Carlo run is one noise draw (every
test input shares it); the unit of replication of a study is one training seed.

Contents
--------
- :func:`mean_ci`, :func:`welford_update`: Student-t interval over draws; streamed
  mean/variance.
- :func:`variance_ci`, :func:`variance_tost`: the chi-square interval of a variance
  from ``n`` normal draws, ``(n−1)s²/σ² ~ χ²_{n−1}``, and the equivalence test of the
  ratio ``σ²/σ²_ref`` built on it.
- :func:`bootstrap_ci`: BCa bootstrap interval (``scipy.stats.bootstrap``) for
  statistics that are not normal.
- :func:`tost_mean`, :func:`tost_t`: two one-sided tests (Schuirmann 1987); the first
  is statsmodels' ``DescrStatsW.ttost_mean``, the second the same test for an
  estimate with a known standard error and degrees of freedom.
- :func:`calibration`: OLS of observed on predicted (statsmodels), slope and intercept
  with intervals, joint F-test of slope 1 and intercept 0.
- :func:`holm`: Holm's step-down adjustment (statsmodels ``multipletests``).
- :class:`Effect`, :func:`paired_effect`, :func:`ols_effect`: an effect with its
  interval and p-value, as every finding of a study reports it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as _st
from scipy.special import digamma

from noiseprop.theory.validation import check_probability

from .formatting import fmt_p

# statsmodels is imported inside the functions that use it: its modules add about 1–2 s
# to ``import noiseprop.empirical`` (python -X importtime), which every CLI command pays.

__all__ = [
    "mean_ci",
    "welford_update",
    "variance_ci",
    "variance_tost",
    "bootstrap_ci",
    "tost_mean",
    "tost_t",
    "Calibration",
    "calibration",
    "holm",
    "Effect",
    "paired_effect",
    "ols_effect",
    "log_variance_bias",
]


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


# ----------------------------------------------------------------------------
# Variances: chi-square interval and equivalence test
# ----------------------------------------------------------------------------
def variance_ci(s2, n, confidence: float = 0.95, df=None):
    """Chi-square interval of a variance estimated from ``n`` normal draws.

    ``(n−1) s²/σ² ~ χ²_{n−1}`` (docs/THEORY.md §8), so the interval for ``σ²`` is
    ``[(n−1)s²/χ²_{n−1, 1−α/2},  (n−1)s²/χ²_{n−1, α/2}]``. Exact for normal data; works
    elementwise on arrays. ``df`` overrides ``n − 1`` (e.g. an effective number of
    degrees of freedom).

    Returns ``(low, high)`` (floats, or arrays shaped like ``s2``).
    """
    confidence = check_probability("confidence", confidence)
    nu = float(n) - 1.0 if df is None else float(df)
    if not nu > 0:
        raise ValueError(f"variance_ci needs n >= 2 draws (df > 0), got n={n!r}, df={df!r}")
    s2 = np.asarray(s2, dtype=np.float64)
    if np.any(s2 < 0):
        raise ValueError("variance_ci: a variance cannot be negative")
    a = 1.0 - confidence
    lo = nu * s2 / _st.chi2.ppf(1.0 - a / 2.0, nu)
    hi = nu * s2 / _st.chi2.ppf(a / 2.0, nu)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def kurtosis_df(values) -> float:
    """Degrees of freedom for :func:`variance_ci` / :func:`variance_tost` of the variance
    of ``values`` when they need not be normal: matching ``Var(s²) ≈ σ⁴(2/(n−1) + κ/n)``
    (``κ`` the excess kurtosis, its bias-corrected sample estimate, taken as at least 0)
    to the chi-square's ``2σ⁴/ν`` gives ``ν = 2/(2/(n−1) + κ/n)``; ``n − 1`` for normal
    data and for fewer than 4 values. On gamma samples (excess kurtosis 0.6, the per-draw
    accuracies' is about that) the 95% interval covered 93.2-93.4% with ``n − 1`` and
    94.7-94.8% with it (n = 10 and 30, 4,000 samples each); at kurtosis 1.5, 88-90% and
    92-94% (``tests/empirical/test_stats.py::test_kurtosis_df_restores_coverage``). No
    floor: mostly tied values with one off by a step (a small noise level's per-draw
    accuracies) have a large sample kurtosis, and ``ν`` falls to about 2 whatever ``n``
    (30 draws: 1.9): a wide interval, no equivalence, as such data warrant."""
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    if n < 4 or not np.all(np.isfinite(v)) or float(np.ptp(v)) == 0.0:
        return float(max(n - 1, 1))
    g2 = max(float(_st.kurtosis(v, fisher=True, bias=False)), 0.0)
    return 2.0 / (2.0 / (n - 1) + g2 / n)


def variance_tost(s2, n, reference, margin: float = 0.10, df=None):
    """Equivalence test of a variance ratio: is ``σ²/reference`` within
    ``[1/(1+margin), 1+margin]``, i.e. ``|log(σ²/reference)| < log(1+margin)``?

    Two one-sided chi-square tests on ``ν s²/σ² ~ χ²_ν`` (``ν = n−1`` unless ``df`` is
    given): ``H0_low: σ² ≤ reference/(1+m)`` is rejected for large ``s²``,
    ``p_low = P(χ²_ν ≥ ν s² (1+m)/reference)``; ``H0_upp: σ² ≥ reference·(1+m)`` for
    small ``s²``, ``p_upp = P(χ²_ν ≤ ν s²/(reference (1+m)))``. The TOST p-value is
    ``max(p_low, p_upp)``; equivalence at level α when it is below α. Exact for normal
    data (docs/THEORY.md §8: "TOST on log(s²/σ²_pred) with a stated margin").

    Returns ``(p, p_low, p_upp)``, floats or arrays.
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0 (a relative margin such as 0.10), got {margin!r}")
    nu = float(n) - 1.0 if df is None else float(df)
    if not nu > 0:
        raise ValueError(f"variance_tost needs n >= 2 draws (df > 0), got n={n!r}, df={df!r}")
    s2 = np.asarray(s2, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if np.any(ref <= 0):
        raise ValueError("variance_tost: the reference variance must be > 0")
    k = 1.0 + float(margin)
    p_low = _st.chi2.sf(nu * s2 * k / ref, nu)
    p_upp = _st.chi2.cdf(nu * s2 / (ref * k), nu)
    p = np.maximum(p_low, p_upp)
    if p.ndim == 0:
        return float(p), float(p_low), float(p_upp)
    return p, p_low, p_upp


def log_variance_bias(n, df=None) -> float:
    """``E[log(s²/σ²)]`` for ``s²`` from ``n`` normal draws: ``ψ(ν/2) − log(ν/2)``,
    ``ν = n−1`` (the log of a scaled χ²_ν). Subtract it from log-ratios of sample to
    true variances so that a perfect prediction has mean log-ratio 0."""
    nu = float(n) - 1.0 if df is None else float(df)
    return float(digamma(nu / 2.0) - math.log(nu / 2.0))


# ----------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------
def bootstrap_ci(data, statistic=np.mean, confidence: float = 0.95, method: str = "BCa",
                 n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of ``statistic(data)`` (``scipy.stats.bootstrap``; BCa by
    default, Efron 1987), resampling the first axis with a seeded generator.

    When the data carry no spread (all values equal) every resample gives the same
    statistic and the interval collapses onto it (BCa itself is undefined there).
    """
    confidence = check_probability("confidence", confidence)
    x = np.asarray(data, dtype=np.float64)
    if x.ndim == 0 or x.shape[0] < 2:
        raise ValueError("bootstrap_ci needs at least two observations")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci: data contain NaN or infinite values")
    if np.all(x == x.flat[0]):
        v = float(statistic(x, axis=0)) if _takes_axis(statistic) else float(statistic(x))
        return v, v
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.simplefilter("ignore", category=getattr(_st, "DegenerateDataWarning", RuntimeWarning))
        res = _st.bootstrap((x,), statistic, confidence_level=confidence, n_resamples=int(n_resamples),
                            method=method, random_state=rng, vectorized=_takes_axis(statistic))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # BCa undefined (e.g. too few distinct values)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = _st.bootstrap((x,), statistic, confidence_level=confidence, n_resamples=int(n_resamples),
                                method="percentile", random_state=np.random.default_rng(seed),
                                vectorized=_takes_axis(statistic))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return lo, hi


def _takes_axis(fn) -> bool:
    return fn in (np.mean, np.median, np.std, np.var, np.sum, np.min, np.max)


# ----------------------------------------------------------------------------
# Equivalence tests (TOST)
# ----------------------------------------------------------------------------
def tost_mean(values, low: float, upp: float) -> tuple[float, float, float]:
    """TOST of ``low < E[X] < upp`` on a sample (statsmodels ``DescrStatsW.ttost_mean``:
    two one-sided Student-t tests, df ``n−1``). Returns ``(p, p_low, p_upp)``;
    equivalence at level α when ``p < α``."""
    from statsmodels.stats.weightstats import DescrStatsW  # lazy: statsmodels adds ~2 s (measured) to importing noiseprop

    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        raise ValueError("tost_mean needs at least two values")
    if not low < upp:
        raise ValueError(f"tost_mean: need low < upp, got ({low!r}, {upp!r})")
    if np.all(v == v[0]):  # zero spread: the mean is known exactly
        inside = low < v[0] < upp
        p = 0.0 if inside else 1.0
        return p, (0.0 if v[0] > low else 1.0), (0.0 if v[0] < upp else 1.0)
    p, lo, up = DescrStatsW(v).ttost_mean(low, upp)
    return float(p), float(lo[1]), float(up[1])


def tost_t(estimate: float, se: float, df: float, low: float, upp: float) -> tuple[float, float, float]:
    """TOST of ``low < θ < upp`` for an estimate with standard error ``se`` and a
    Student-t reference with ``df`` degrees of freedom (``df=inf``: normal):
    ``p_low = P(T ≥ (θ̂−low)/se)``, ``p_upp = P(T ≤ (θ̂−upp)/se)``, ``p = max``.
    Identical to :func:`tost_mean` when ``se = s/√n`` and ``df = n−1``."""
    if not low < upp:
        raise ValueError(f"tost_t: need low < upp, got ({low!r}, {upp!r})")
    if not (se >= 0 and np.isfinite(se)):
        return float("nan"), float("nan"), float("nan")
    if se == 0:
        p_low = 0.0 if estimate > low else 1.0
        p_upp = 0.0 if estimate < upp else 1.0
        return max(p_low, p_upp), p_low, p_upp
    dist = _st.t(df) if np.isfinite(df) else _st.norm()
    p_low = float(dist.sf((estimate - low) / se))
    p_upp = float(dist.cdf((estimate - upp) / se))
    return max(p_low, p_upp), p_low, p_upp


# ----------------------------------------------------------------------------
# Calibration regression
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """OLS of observed on predicted: ``observed = intercept + slope · predicted + e``.

    A calibrated prediction has slope 1 and intercept 0; ``f_pvalue`` is the joint
    F-test (Wald test under a robust covariance) of exactly that. ``log``: both sides
    were log-transformed first (variances). ``cov_type``: "nonrobust" or "cluster"
    (clustered by ``groups``, e.g. the input of each (input, class) element).
    """

    n: int
    slope: float
    slope_ci: tuple[float, float]
    intercept: float
    intercept_ci: tuple[float, float]
    f_stat: float
    f_pvalue: float
    r2: float
    log: bool
    cov_type: str
    confidence: float = 0.95
    note: str = ""

    @property
    def calibrated(self) -> bool | None:
        """Not rejected at 1 − confidence (None when the test could not be run)."""
        if not np.isfinite(self.f_pvalue):
            return None
        return bool(self.f_pvalue >= 1 - self.confidence)

    def to_dict(self) -> dict:
        return dict(n=self.n, slope=self.slope, slope_ci_low=self.slope_ci[0], slope_ci_high=self.slope_ci[1],
                    intercept=self.intercept, intercept_ci_low=self.intercept_ci[0],
                    intercept_ci_high=self.intercept_ci[1], f_stat=self.f_stat, f_pvalue=self.f_pvalue,
                    r2=self.r2, log=self.log, cov_type=self.cov_type, note=self.note)

    def summary(self) -> str:
        pct = int(round(self.confidence * 100))
        scale = "log-log " if self.log else ""
        s = (f"{scale}calibration over {self.n} points: slope {self.slope:.4g} [{self.slope_ci[0]:.4g}, "
             f"{self.slope_ci[1]:.4g}], intercept {self.intercept:.4g} [{self.intercept_ci[0]:.4g}, "
             f"{self.intercept_ci[1]:.4g}] ({pct}% CI); F-test slope=1 & intercept=0: "
             f"F={self.f_stat:.4g}, p={self.f_pvalue:.3g}")
        return s + (f" ({self.note})" if self.note else "")


def _nan_calibration(n, log, cov_type, confidence, note) -> Calibration:
    nan = float("nan")
    return Calibration(n=n, slope=nan, slope_ci=(nan, nan), intercept=nan, intercept_ci=(nan, nan), f_stat=nan,
                       f_pvalue=nan, r2=nan, log=log, cov_type=cov_type, confidence=confidence, note=note)


def calibration(observed, predicted, log: bool = False, groups=None, confidence: float = 0.95,
                offset: float = 0.0) -> Calibration:
    """Calibration regression (docs/THEORY.md §8): OLS of ``observed`` on ``predicted``
    (statsmodels), slope and intercept with ``confidence`` intervals, and the joint
    F-test of ``slope = 1, intercept = 0``.

    ``log=True`` regresses ``log(observed) − offset`` on ``log(predicted)`` (pairs with
    a non-positive value are dropped and counted in ``note``); ``offset`` removes a
    known bias of the log of an estimate, e.g. :func:`log_variance_bias` for sample
    variances. ``groups``: cluster-robust covariance (statsmodels ``cov_type="cluster"``)
    for points that are not independent, e.g. the classes of one input.
    """
    import statsmodels.api as sm  # lazy: statsmodels adds ~2 s (measured) to importing noiseprop

    confidence = check_probability("confidence", confidence)
    obs = np.asarray(observed, dtype=np.float64).ravel()
    pred = np.asarray(predicted, dtype=np.float64).ravel()
    if obs.shape != pred.shape:
        raise ValueError(f"calibration: observed has {obs.size} values, predicted {pred.size}")
    g = None if groups is None else np.asarray(groups).ravel()
    if g is not None and g.shape != obs.shape:
        raise ValueError(f"calibration: groups has {g.size} values, observed {obs.size}")
    keep = np.isfinite(obs) & np.isfinite(pred)
    note = []
    if log:
        keep &= (obs > 0) & (pred > 0)
    dropped = int(obs.size - keep.sum())
    if dropped:
        note.append(f"{dropped} non-positive or non-finite pairs dropped" if log else f"{dropped} non-finite pairs dropped")
    obs, pred = obs[keep], pred[keep]
    if g is not None:
        g = g[keep]
    cov_type = "cluster" if g is not None else "nonrobust"
    n = int(obs.size)
    if log:
        obs, pred = np.log(obs) - offset, np.log(pred)
    if n < 3:
        return _nan_calibration(n, log, cov_type, confidence, "; ".join(note + ["fewer than 3 points"]))
    if np.ptp(pred) <= 1e-12 * max(1.0, np.abs(pred).max()):
        return _nan_calibration(n, log, cov_type, confidence,
                                "; ".join(note + ["predicted values are constant: slope undefined"]))
    X = sm.add_constant(pred, has_constant="add")
    model = sm.OLS(obs, X)
    if g is not None:
        if len(np.unique(g)) < 3:
            return _nan_calibration(n, log, cov_type, confidence, "; ".join(note + ["fewer than 3 clusters"]))
        _, g_codes = np.unique(g, return_inverse=True)
        res = model.fit(cov_type="cluster", cov_kwds={"groups": g_codes})
    else:
        res = model.fit()
    ci = np.asarray(res.conf_int(alpha=1 - confidence))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ft = res.f_test((np.eye(2), np.array([0.0, 1.0])))
    f_stat = float(np.squeeze(ft.fvalue))
    f_p = float(np.squeeze(ft.pvalue))
    if not np.isfinite(res.bse).all() or np.all(res.resid == 0):
        note.append("perfect fit: no residual spread")
    return Calibration(n=n, slope=float(res.params[1]), slope_ci=(float(ci[1, 0]), float(ci[1, 1])),
                       intercept=float(res.params[0]), intercept_ci=(float(ci[0, 0]), float(ci[0, 1])),
                       f_stat=f_stat, f_pvalue=f_p, r2=float(res.rsquared), log=log, cov_type=cov_type,
                       confidence=confidence, note="; ".join(note))


# ----------------------------------------------------------------------------
# Multiple testing
# ----------------------------------------------------------------------------
def holm(pvalues, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down adjustment (statsmodels ``multipletests(method="holm")``).

    NaN p-values are left out of the family and stay NaN. Returns
    ``(adjusted_p, reject)``.
    """
    from statsmodels.stats.multitest import multipletests  # lazy: statsmodels adds ~2 s (measured) to importing noiseprop

    p = np.asarray(pvalues, dtype=np.float64).ravel()
    adj = np.full(p.shape, np.nan)
    rej = np.zeros(p.shape, dtype=bool)
    ok = np.isfinite(p)
    if ok.any():
        r, a, _, _ = multipletests(np.clip(p[ok], 0.0, 1.0), alpha=alpha, method="holm")
        adj[ok] = a
        rej[ok] = r
    return adj, rej


# ----------------------------------------------------------------------------
# Effects, as every finding reports them
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Effect:
    """An estimated effect with its interval and two-sided p-value.

    ``estimate`` is in the units of ``unit``; ``standardized`` is a unit-free effect
    size when one is defined (Cohen's d_z for paired differences). ``method`` says
    which test produced it.
    """

    name: str
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    method: str
    df: float = float("nan")
    se: float = float("nan")
    standardized: float = float("nan")
    unit: str = ""
    confidence: float = 0.95
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(name=self.name, estimate=self.estimate, ci_low=self.ci_low, ci_high=self.ci_high,
                 p_value=self.p_value, n=self.n, df=self.df, se=self.se, standardized=self.standardized,
                 method=self.method, unit=self.unit, confidence=self.confidence)
        d.update({f"extra_{k}": v for k, v in self.extra.items()})
        return d

    def describe(self) -> str:
        pct = int(round(self.confidence * 100))
        es = f", d={self.standardized:.2f}" if np.isfinite(self.standardized) else ""
        return (f"{self.estimate:+.4g} {self.unit}".rstrip() +
                f" ({pct}% CI [{self.ci_low:.4g}, {self.ci_high:.4g}], p={fmt_p(self.p_value)}{es}; {self.method})")


def paired_effect(a, b, name: str = "difference", confidence: float = 0.95, unit: str = "") -> Effect:
    """Paired difference ``a − b`` across matched units (training seeds): mean
    difference, Student-t interval and two-sided p-value (``scipy.stats.ttest_rel``),
    Cohen's ``d_z = mean/sd`` of the differences."""
    confidence = check_probability("confidence", confidence)
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_effect: {a.size} vs {b.size} values; the pairs must match")
    d = a - b
    n = d.size
    if n < 2:
        m = float(d.mean()) if n else float("nan")
        return Effect(name, m, float("nan"), float("nan"), float("nan"), n, "paired t (too few pairs)",
                      unit=unit, confidence=confidence)
    m, se, (lo, hi) = mean_ci(d, confidence)
    sd = float(d.std(ddof=1))
    if sd == 0:
        # identical differences (e.g. accuracies on a discrete grid): the t-test is
        # undefined, and a zero spread from a few seeds is no evidence of precision
        nan = float("nan")
        return Effect(name, m, nan, nan, nan, n, "paired t-test across seeds (undefined: the differences have no "
                      "spread)", df=n - 1, se=nan, unit=unit, confidence=confidence)
    p = float(_st.ttest_rel(a, b).pvalue)
    return Effect(name, m, lo, hi, p, n, "paired t-test across seeds", df=n - 1, se=se, standardized=m / sd,
                  unit=unit, confidence=confidence)


def ols_effect(frame, formula: str, term: str, name: str | None = None, confidence: float = 0.95,
               unit: str = "", groups: str | None = None):
    """Fit ``formula`` by OLS (statsmodels formula API) on ``frame`` and return the
    :class:`Effect` of coefficient ``term`` (its t-test and interval) and the fit.

    ``groups``: a column for cluster-robust standard errors. Used with the training
    seed as a factor, e.g. ``"robustness ~ n_bn + C(seed)"``.
    """
    import statsmodels.formula.api as smf  # lazy: statsmodels adds ~2 s (measured) to importing noiseprop

    confidence = check_probability("confidence", confidence)
    model = smf.ols(formula, data=frame)
    if groups is not None:
        res = model.fit(cov_type="cluster", cov_kwds={"groups": frame[groups].astype("category").cat.codes})
    else:
        res = model.fit()
    if term not in res.params.index:
        raise ValueError(f"term {term!r} is not in the fitted model; terms: {list(res.params.index)}")
    ci = res.conf_int(alpha=1 - confidence).loc[term]
    resid_sd = float(np.sqrt(res.scale)) if res.df_resid > 0 else float("nan")
    eff = Effect(name or term, float(res.params[term]), float(ci.iloc[0]), float(ci.iloc[1]),
                 float(res.pvalues[term]), int(res.nobs), f"OLS {formula}", df=float(res.df_resid),
                 se=float(res.bse[term]), standardized=float(res.params[term]) / resid_sd if resid_sd > 0 else float("nan"),
                 unit=unit, confidence=confidence)
    return eff, res
