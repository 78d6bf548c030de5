"""Prediction against Monte-Carlo: statistical verdicts (docs/THEORY.md §8).

:func:`compare` puts one analytic :class:`~noiseprop.theory.predict.Prediction` beside
one :class:`~noiseprop.empirical.montecarlo.MCResult` of the same model, inputs and
noise, and for each quantity reports the predicted and observed value, the relative
error, an interval for the observed value, an equivalence test (TOST) at a stated
margin, and a calibration regression over the (input, class) elements.
:func:`compare_cells` does the same over many cells (models × noise levels × seeds):
per-cell tests with Holm's correction, and calibration across cells.

Quantities and their tests (unit of replication: one noise draw, n = draws)
---------------------------------------------------------------------------
``logit_var``
    Scalar: the mean over inputs and classes of the per-element logit variance.
    Interval: chi-square with ``n−1`` degrees of freedom, ``(n−1)s²/σ² ~ χ²_{n−1}``.
    For one element this is exact (normal logits); for the mean over elements it is
    conservative: the elements share the draws, and by Cauchy–Schwarz
    ``Var(Σ_k s²_k) = 2/(n−1) Σ_kl Σ_kl² ≤ 2/(n−1) (Σ_k σ²_k)²`` — the variance of one
    scaled χ²_{n−1} with the same mean. TOST on the log-ratio with margin
    ``±log(1+var_margin)`` (default ±10%) via :func:`~.stats.variance_tost`.
    Calibration: OLS of ``log s²_k − E[log χ²_{n−1}/(n−1)]`` on ``log σ²_pred,k`` over
    elements, cluster-robust by input. Diagnostics: median per-element relative error
    and the fraction of per-element chi-square intervals that contain the prediction
    (≈ ``confidence`` for an exact prediction).
``logit_mean_shift``
    Scalar: the mean over elements of ``E[f(θ+ε)] − f(θ)``. Interval: Student-t with a
    conservative standard error ``mean_k(s_k)/√n`` (same Cauchy–Schwarz bound). TOST
    margin: ``±shift_margin × √(mean predicted variance)`` (default a tenth of the
    typical logit noise std). Calibration: linear OLS over elements, cluster-robust.
``accuracy``
    Per-draw accuracies; interval Student-t over draws, ``x̄ ± t_{n−1} s/√n`` (the
    Monte-Carlo engine's own interval and the TOST's reference); TOST (two one-sided t
    tests, as statsmodels ``ttost_mean``) at ``±acc_margin`` (default ±1 percentage
    point). The draws' s.d. is at least one step 1/N (a per-draw accuracy is a multiple of
    1/N for N inputs, and a spread below one step hides in ties): with 0, 2-3 tied draws
    gave an exact mean, "equivalent" and a zero-width interval (23 of 40 runs of 3 draws
    at η = 0.05 on a digits MLP); the accuracy spread's interval takes the same floor.
    Not BCa: with the
    few draws of a study cell the BCa bootstrap interval is too narrow. Resampling 12
    draws from 500-draw populations of per-draw accuracies (five report models, five
    levels each), BCa covered the population mean 90.5% of the time (84–93% per
    level), the t interval 94.3% (92–97%) (``benchmarks/ci_coverage.py``).
``accuracy_std`` (when the prediction has it)
    The draw-to-draw spread of accuracy: chi-square interval of the variance of the
    per-draw accuracies, its degrees of freedom adjusted for their excess kurtosis
    (:func:`~.stats.kurtosis_df`: with ``n − 1`` the interval covered 92-92.5% on a
    digits MLP, 10-30 draws, per-draw accuracies skewed −0.38 with excess kurtosis 0.61);
    TOST on the variance log-ratio at ``±var_margin``, on the same degrees of freedom.
``loss_increase``
    Per-draw ``loss − clean loss``; interval Student-t over draws (the same check at 12
    draws: 93.0% against BCa's 89.5%, ``benchmarks/ci_coverage.py --quantity
    loss_increase``; right-skewed at large noise, so a little short); TOST on the mean at
    ``[pred/(1+m), pred·(1+m)]`` (``m = loss_margin``, default 10%), with the
    prediction's own standard error (Hutchinson), when it has one, added in quadrature.

The prediction object is duck-typed: ``logit_mean``, ``logit_var`` ([N, C]),
optionally ``clean_logits``, ``accuracy``, ``accuracy_std``, ``loss_increase``,
``loss_increase_se``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st

from noiseprop.theory.noise import parse_noise
from noiseprop.theory.targets import Targets
from noiseprop.theory.validation import check_number, check_probability

from .stats import (
    Calibration,
    calibration,
    holm,
    kurtosis_df,
    log_variance_bias,
    mean_ci,
    tost_t,
    variance_ci,
    variance_tost,
)

__all__ = ["QuantityComparison", "Comparison", "compare", "CellComparison", "compare_cells", "combine_cells"]

QUANTITIES = ("logit_var", "logit_mean_shift", "accuracy", "accuracy_std", "loss_increase")


def _np(a) -> np.ndarray | None:
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _scalar(a) -> float | None:
    """A float, or ``None`` for a missing or NaN value (a quantity the prediction
    does not provide, e.g. ``accuracy_std`` computed with no draws)."""
    if a is None:
        return None
    if hasattr(a, "item") and not isinstance(a, (float, int)):
        a = a.item()
    a = float(a)
    return None if math.isnan(a) else a


@dataclass(frozen=True)
class QuantityComparison:
    """One quantity: predicted vs observed, with the observed value's interval and an
    equivalence test at a stated margin.

    ``rel_error = (predicted − observed)/|observed|``; ``difference = predicted −
    observed``. ``margin = (low, upp)`` are the equivalence bounds on the *observed
    quantity's expectation* (same units); ``equivalent`` is ``tost_p < alpha``.
    """

    quantity: str
    predicted: float
    observed: float
    ci_low: float
    ci_high: float
    ci_method: str
    margin_low: float
    margin_high: float
    margin_desc: str
    tost_p: float
    alpha: float
    n: int
    extra: dict = field(default_factory=dict)

    @property
    def difference(self) -> float:
        return self.predicted - self.observed

    @property
    def rel_error(self) -> float:
        if self.observed == 0 or not np.isfinite(self.observed):
            return float("nan")
        return (self.predicted - self.observed) / abs(self.observed)

    @property
    def equivalent(self) -> bool | None:
        if not np.isfinite(self.tost_p):
            return None
        return bool(self.tost_p < self.alpha)

    @property
    def ci_contains_prediction(self) -> bool | None:
        if not (np.isfinite(self.ci_low) and np.isfinite(self.ci_high)):
            return None
        return bool(self.ci_low <= self.predicted <= self.ci_high)

    def to_dict(self) -> dict:
        d = dict(quantity=self.quantity, predicted=self.predicted, observed=self.observed,
                 difference=self.difference, rel_error=self.rel_error, ci_low=self.ci_low, ci_high=self.ci_high,
                 ci_method=self.ci_method, ci_contains_prediction=self.ci_contains_prediction,
                 margin_low=self.margin_low, margin_high=self.margin_high, margin=self.margin_desc,
                 tost_p=self.tost_p, equivalent=self.equivalent, n=self.n)
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class Comparison:
    """Prediction vs Monte-Carlo for one model, input set and noise (see module doc)."""

    quantities: tuple
    calibrations: dict
    noise: str
    draws: int
    n_inputs: int
    num_classes: int
    alpha: float
    confidence: float

    def __getitem__(self, name: str) -> QuantityComparison:
        for q in self.quantities:
            if q.quantity == name:
                return q
        raise KeyError(f"no quantity {name!r} in this comparison; available: {[q.quantity for q in self.quantities]}")

    @property
    def names(self) -> list[str]:
        return [q.quantity for q in self.quantities]

    def to_frame(self) -> pd.DataFrame:
        """One row per quantity: predicted, observed, errors, CI, margin, TOST, and the
        calibration regression over elements where there is one."""
        rows = []
        for q in self.quantities:
            d = q.to_dict()
            cal = self.calibrations.get(q.quantity)
            if cal is not None:
                d.update({f"cal_{k}": v for k, v in cal.to_dict().items()})
            rows.append(d)
        return pd.DataFrame(rows)

    def summary(self) -> str:
        pct = int(round(self.confidence * 100))
        lines = [f"Prediction vs Monte-Carlo under {self.noise}: {self.draws} draws, {self.n_inputs} inputs, "
                 f"{self.num_classes} classes; TOST at alpha={self.alpha:g}",
                 f"  {'quantity':<18}{'predicted':>12}{'observed':>12}{'rel.err':>9}   {pct}% CI of observed"
                 f"{'':<8}{'margin':<24}{'TOST p':>8}  equivalent"]
        for q in self.quantities:
            ci = f"[{q.ci_low:.4g}, {q.ci_high:.4g}]"
            eq = {True: "yes", False: "no", None: "n/a"}[q.equivalent]
            lines.append(f"  {q.quantity:<18}{q.predicted:>12.4g}{q.observed:>12.4g}{q.rel_error:>+9.2%}   "
                         f"{ci:<26}{q.margin_desc:<24}{q.tost_p:>8.3g}  {eq}")
        for name, cal in self.calibrations.items():
            lines.append(f"  {name}: {cal.summary()}")
        for q in self.quantities:
            for k, v in q.extra.items():
                lines.append(f"  {q.quantity} {k}: {v:.4g}" if isinstance(v, float) else f"  {q.quantity} {k}: {v}")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def _noise_of(result):
    """The result's noise model: the object it carries (``noise_model``), else its
    string form parsed (``relative:0.1``; a sweep's ``relative@0.1`` too)."""
    model = getattr(result, "noise_model", None)
    if model is not None:
        return model
    text = getattr(result, "noise", None)
    if not isinstance(text, str):
        return None
    try:
        return parse_noise(text.replace("@", ":"))
    except ValueError:
        return None


def _field_difference(a, b) -> str:
    """``"name x vs y, ..."`` for the dataclass fields where ``a`` and ``b`` differ ("" if
    none, or if they are not dataclasses)."""
    try:
        names = [f.name for f in fields(a)]
    except TypeError:
        return ""
    return ", ".join(f"{n} {getattr(a, n)!r} vs {getattr(b, n)!r}" for n in names if getattr(a, n) != getattr(b, n))


def _noise_difference(a, b) -> str | None:
    """What differs between two noise models (``None``: the same). Levels are compared
    up to the 6 significant digits of their string forms (``relative@0.1``)."""
    if a == b:
        return None
    if type(a) is not type(b):
        return f"family {type(a).__name__} vs {type(b).__name__}"
    la, lb = getattr(a, "level", None), getattr(b, "level", None)
    try:
        fa, fb = a.with_level(1.0), b.with_level(1.0)
    except (AttributeError, NotImplementedError, ValueError):  # no level 1 (StuckAt with p_max > 0): field by field
        return _field_difference(a, b) or "settings differ"
    if fa != fb:
        return "family settings: " + _field_difference(fa, fb)
    if la is None or lb is None or not math.isclose(la, lb, rel_tol=1e-5, abs_tol=1e-12):
        return f"level {la:g} vs {lb:g}"
    return None


def _targets_difference(a, b) -> str | None:
    """What differs between two targets (objects field by field; a display string against
    an object by its description)."""
    if isinstance(a, Targets) and isinstance(b, Targets):
        diff = [f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in fields(Targets)
                if getattr(a, f.name) != getattr(b, f.name)]
        return ", ".join(diff) or None
    da, db = (t.describe() if isinstance(t, Targets) else t for t in (a, b))
    return None if da == db else f"{da} vs {db}"


def _check_same_setting(prediction, mc) -> None:
    """Refuse a prediction and a simulation whose noise, targets, inputs or clean model
    differ, naming the difference (a prediction at η = 0.1 must not be compared with a
    simulation at η = 0.3). The objects the results carry are compared (``noise_model``,
    ``targets_spec``); results without them, by their string forms."""
    pn, mn = _noise_of(prediction), _noise_of(mc)
    what = _noise_difference(pn, mn) if pn is not None and mn is not None else None
    if what:
        raise ValueError(f"prediction and Monte-Carlo used different noise: prediction {pn}, Monte-Carlo {mn} "
                         f"({what}); compare results of the same noise model and level")
    pt = getattr(prediction, "targets_spec", None) or getattr(prediction, "targets", None)
    mt = getattr(mc, "targets_spec", None) or getattr(mc, "targets", None)
    what = _targets_difference(pt, mt) if pt is not None and mt is not None else None
    if what:
        raise ValueError(f"prediction and Monte-Carlo put noise on different targets ({what}): prediction "
                         f"{pt.describe() if isinstance(pt, Targets) else pt}, Monte-Carlo "
                         f"{mt.describe() if isinstance(mt, Targets) else mt}")
    pf, mf = getattr(prediction, "inputs_fingerprint", None), getattr(mc, "inputs_fingerprint", None)
    if pf and mf and pf != mf:
        raise ValueError(f"prediction and Monte-Carlo were computed on different inputs (fingerprints {pf[:12]} "
                         f"and {mf[:12]}); compare results on the same x and y")
    pc, mcl = _np(getattr(prediction, "clean_logits", None)), _np(getattr(mc, "clean_logits", None))
    if pc is not None and mcl is not None:
        if pc.shape != mcl.shape:
            raise ValueError(f"prediction and Monte-Carlo disagree on the clean logits' shape: {pc.shape} vs "
                             f"{mcl.shape}; compare the same model and inputs")
        scale = max(1.0, float(np.abs(mcl).max())) if mcl.size else 1.0
        gap = float(np.abs(pc - mcl).max()) if mcl.size else 0.0
        if gap > 1e-3 * scale:
            raise ValueError(f"prediction and Monte-Carlo have different clean logits (max difference {gap:.3g}): "
                             "they were not computed on the same model and inputs")


def compare(prediction, mc, *, var_margin: float = 0.10, acc_margin: float = 0.01, shift_margin: float = 0.10,
            loss_margin: float = 0.10, alpha: float = 0.05, confidence: float = 0.95,
            calibrate: bool = True) -> Comparison:
    """Compare an analytic prediction with a Monte-Carlo run (see the module doc for
    every quantity's interval, margin and test).

    Parameters
    ----------
    prediction: a ``Prediction`` (``logit_mean``, ``logit_var`` [N, C]; optionally
        ``clean_logits``, ``accuracy``, ``accuracy_std``, ``loss_increase``,
        ``loss_increase_se``).
    mc: an ``MCResult`` of the same model, inputs and noise. Refused, with the difference
        named, when the two carry different noise models or levels, different targets,
        different input fingerprints, or different clean logits.
    var_margin: relative equivalence margin for variances: ``|log ratio| < log(1+m)``.
    acc_margin: absolute margin for accuracy (fraction; 0.01 = one percentage point).
    shift_margin: margin for the mean logit shift, in units of the typical predicted
        logit noise std ``√(mean σ²_pred)``.
    loss_margin: relative margin for the loss increase.
    alpha: level of the equivalence tests; confidence: level of intervals.
    calibrate: run the calibration regressions over elements (skip them to save time
        when only the scalar tests are needed).

    >>> import torch
    >>> from torch import nn
    >>> from noiseprop.theory import RelativeGaussian, predict
    >>> from noiseprop.empirical import monte_carlo
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> pred = predict(net, x, y, RelativeGaussian(0.05))
    >>> mc = monte_carlo(net, x, y, RelativeGaussian(0.05), draws=100, seed=0)
    >>> cmp = compare(pred, mc)
    >>> cmp.names[:3]
    ['logit_var', 'logit_mean_shift', 'accuracy']
    >>> 0.8 < cmp["logit_var"].predicted / cmp["logit_var"].observed < 1.25
    True
    >>> compare(pred, monte_carlo(net, x, y, RelativeGaussian(0.2), draws=10, seed=0))
    Traceback (most recent call last):
    ...
    ValueError: prediction and Monte-Carlo used different noise: prediction relative:0.05, Monte-Carlo relative:0.2 (level 0.05 vs 0.2); compare results of the same noise model and level
    """
    for name, v in (("var_margin", var_margin), ("acc_margin", acc_margin), ("shift_margin", shift_margin),
                    ("loss_margin", loss_margin)):
        check_number(name, v, 0.0, open_min=True)
    alpha = check_number("alpha", alpha, 0.0, 0.5, open_min=True, open_max=True)
    confidence = check_probability("confidence", confidence)
    for attr in ("logit_mean", "logit_var", "clean_logits", "accuracies", "losses", "clean_loss", "draws"):
        if not hasattr(mc, attr):
            raise TypeError(f"mc must be an MCResult (missing attribute {attr!r}), got {type(mc).__name__}")
    for attr in ("logit_mean", "logit_var"):
        if getattr(prediction, attr, None) is None:
            raise TypeError(f"prediction must carry {attr!r} (a Prediction), got {type(prediction).__name__}")
    n = int(mc.draws)
    pv, ov = _np(prediction.logit_var), _np(mc.logit_var)
    if pv.shape != ov.shape or pv.ndim != 2:
        raise ValueError(f"prediction and Monte-Carlo disagree on the logit table: predicted logit_var "
                         f"{tuple(pv.shape)}, observed {tuple(ov.shape)}; compare the same model, inputs and noise")
    _check_same_setting(prediction, mc)
    N, C = ov.shape
    quantities: list[QuantityComparison] = []
    calibrations: dict[str, Calibration] = {}
    groups = np.repeat(np.arange(N), C)

    # -- logit variance ------------------------------------------------------------
    # a prediction with classes=k leaves the other classes' variance unknown (NaN): the
    # variance is compared over the logits it differentiated
    known = np.isfinite(pv)
    part = "" if known.all() else f"; over the {int(known.sum())} of {known.size} logits the prediction differentiated"
    pvk, ovk, vgroups = (pv, ov, groups) if known.all() else (pv[known], ov[known], groups[known.reshape(-1)])
    pred_v, obs_v = float(pvk.mean()), float(ovk.mean())
    lo, hi = variance_ci(obs_v, n, confidence)
    k = 1.0 + var_margin
    if pred_v > 0:
        p_eq = variance_tost(obs_v, n, pred_v, var_margin)[0]
    else:
        p_eq = float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        elem_rel = np.where(ovk > 0, (pvk - ovk) / ovk, np.nan)
        elo, ehi = variance_ci(ovk, n, confidence)
    valid = np.isfinite(elem_rel)
    extra = dict(
        median_abs_rel_error=float(np.nanmedian(np.abs(elem_rel))) if valid.any() else float("nan"),
        pooled_ratio=float(ovk.sum() / pvk.sum()) if pvk.sum() > 0 else float("nan"),
        elementwise_ci_coverage=float(((elo <= pvk) & (pvk <= ehi))[ovk > 0].mean()) if (ovk > 0).any() else float("nan"),
    )
    quantities.append(QuantityComparison(
        "logit_var", pred_v, obs_v, lo, hi, f"chi-square df={n - 1} (conservative for the mean over elements){part}",
        pred_v / k, pred_v * k, f"ratio within ±{var_margin:.0%} (log)", p_eq, alpha, n, extra))
    if calibrate:
        calibrations["logit_var"] = calibration(ovk, pvk, log=True, groups=vgroups, confidence=confidence,
                                                offset=log_variance_bias(n))

    # -- logit mean shift ------------------------------------------------------------
    clean_pred = _np(getattr(prediction, "clean_logits", None))
    clean_obs = _np(mc.clean_logits)
    if clean_pred is None or clean_pred.shape != clean_obs.shape:
        clean_pred = clean_obs
    ps = _np(prediction.logit_mean) - clean_pred
    os_ = _np(mc.logit_mean) - clean_obs
    pred_s, obs_s = float(ps.mean()), float(os_.mean())
    se = float(np.sqrt(np.clip(ov, 0, None)).mean() / math.sqrt(n))
    h = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * se
    width = shift_margin * math.sqrt(pred_v) if pred_v > 0 else float("nan")
    if np.isfinite(width) and width > 0:
        p_eq = tost_t(obs_s, se, n - 1, pred_s - width, pred_s + width)[0]
        m_lo, m_hi = pred_s - width, pred_s + width
    else:
        p_eq, m_lo, m_hi = float("nan"), float("nan"), float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(ov > 0, (os_ - ps) / np.sqrt(ov / n), np.nan)
    extra = dict(rms_observed=float(np.sqrt((os_ ** 2).mean())), rms_predicted=float(np.sqrt((ps ** 2).mean())),
                 rms_standardized_error=float(np.sqrt(np.nanmean(z ** 2))) if np.isfinite(z).any() else float("nan"))
    quantities.append(QuantityComparison(
        "logit_mean_shift", pred_s, obs_s, obs_s - h, obs_s + h, f"t df={n - 1}, conservative s.e.",
        m_lo, m_hi, f"±{shift_margin:g}·noise std", p_eq, alpha, n, extra))
    if calibrate:
        calibrations["logit_mean_shift"] = calibration(os_, ps, log=False, groups=groups, confidence=confidence)

    # -- accuracy ----------------------------------------------------------------------
    accs = np.asarray(mc.accuracies, dtype=np.float64)
    pred_acc = _scalar(getattr(prediction, "accuracy", None))
    if pred_acc is not None:
        # an accuracy is a multiple of 1/N: a spread below one step hides in ties, so the
        # draws' s.d. is at least one step (with 0, 2-3 tied draws were an exact mean)
        obs_a, sd = float(accs.mean()), max(float(accs.std(ddof=1)), 1.0 / N)
        se_a = sd / math.sqrt(n)
        h = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * se_a
        how = f"Student-t over draws, df={n - 1}, s.d. at least one step 1/N"
        lo, hi = max(obs_a - h, 0.0), min(obs_a + h, 1.0)  # an accuracy's mean lies in [0, 1]
        p_eq = tost_t(obs_a, se_a, n - 1, pred_acc - acc_margin, pred_acc + acc_margin)[0]
        quantities.append(QuantityComparison(
            "accuracy", pred_acc, obs_a, lo, hi, how, pred_acc - acc_margin,
            pred_acc + acc_margin, f"±{acc_margin * 100:g} pp", p_eq, alpha, n,
            dict(observed_se=se_a)))

    pred_astd = _scalar(getattr(prediction, "accuracy_std", None))
    if pred_astd is not None:
        s2 = float(accs.var(ddof=1))
        nu = kurtosis_df(accs)  # the per-draw accuracies are not normal (skewed, excess kurtosis ~0.6)
        s2f = max(s2, 1.0 / N ** 2) if N > 0 else s2  # as the accuracy's: at least one step 1/N
        lo, hi = variance_ci(s2f, n, confidence, df=nu)
        p_eq = variance_tost(s2f, n, pred_astd ** 2, var_margin, df=nu)[0] if pred_astd > 0 else float("nan")
        quantities.append(QuantityComparison(
            "accuracy_std", pred_astd, math.sqrt(s2), math.sqrt(lo), math.sqrt(hi),
            f"chi-square df={nu:.3g} (n−1 = {n - 1}, adjusted for the draws' excess kurtosis)",
            pred_astd / math.sqrt(k), pred_astd * math.sqrt(k), f"variance ratio within ±{var_margin:.0%} (log)",
            p_eq, alpha, n))

    # -- loss increase -----------------------------------------------------------------
    pred_l = _scalar(getattr(prediction, "loss_increase", None))
    if pred_l is not None:
        inc = np.asarray(mc.losses, dtype=np.float64) - float(mc.clean_loss)
        obs_l, se_l, (lo, hi) = mean_ci(inc, confidence)
        pred_se = _scalar(getattr(prediction, "loss_increase_se", None)) or 0.0
        se = math.sqrt(se_l ** 2 + pred_se ** 2)
        kl = 1.0 + loss_margin
        if pred_l > 0:
            b_lo, b_hi = pred_l / kl, pred_l * kl
            p_eq = tost_t(obs_l, se, n - 1, b_lo, b_hi)[0]
        else:
            b_lo = b_hi = p_eq = float("nan")
        quantities.append(QuantityComparison(
            "loss_increase", pred_l, obs_l, lo, hi, f"Student-t over draws, df={n - 1}", b_lo, b_hi,
            f"ratio within ±{loss_margin:.0%}", p_eq, alpha, n,
            dict(prediction_se=pred_se, observed_se=se_l)))

    noise = getattr(mc, "noise", "")
    return Comparison(tuple(quantities), calibrations, str(noise), n, N, C, float(alpha), float(confidence))


# ----------------------------------------------------------------------------
# Many cells
# ----------------------------------------------------------------------------
#: Which quantities are calibrated on the log scale across cells.
_LOG_SCALE = {"logit_var": True, "accuracy_std": True, "loss_increase": True, "accuracy": False,
              "logit_mean_shift": False}


@dataclass(frozen=True)
class CellComparison:
    """Many comparisons (cells): per-cell tests with Holm's correction within each
    quantity, and calibration regressions across cells.

    ``frame``: one row per cell × quantity with ``tost_p_holm`` and
    ``equivalent_holm``. ``calibrations``: quantity → :class:`Calibration` of the
    observed values on the predicted ones across cells (log scale for variances and
    the loss increase).
    """

    frame: pd.DataFrame
    calibrations: dict
    alpha: float

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def calibration_frame(self) -> pd.DataFrame:
        return pd.DataFrame([dict(quantity=q, **c.to_dict()) for q, c in self.calibrations.items()])

    def summary(self) -> str:
        lines = [f"{self.frame['cell'].nunique()} cells; TOST with Holm's correction within each quantity at "
                 f"alpha={self.alpha:g}"]
        for q, sub in self.frame.groupby("quantity", sort=False):
            eq = int(sub["equivalent_holm"].fillna(False).astype(bool).sum())
            med = float(np.nanmedian(np.abs(sub["rel_error"]))) if len(sub) else float("nan")
            lines.append(f"  {q:<18} equivalent in {eq}/{len(sub)} cells; median |rel. error| {med:.3g}")
            if q in self.calibrations:
                lines.append(f"  {'':<18} {self.calibrations[q].summary()}")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def compare_cells(comparisons: Sequence[Comparison] | dict, labels: Sequence | None = None,
                  alpha: float | None = None, confidence: float = 0.95) -> CellComparison:
    """Combine per-cell :class:`Comparison` objects: Holm-adjusted TOST p-values
    within each quantity (statsmodels ``multipletests``), and the calibration
    regression of observed on predicted across cells.

    ``comparisons``: a sequence (with ``labels``) or a mapping label → Comparison.

    >>> import torch
    >>> from noiseprop.theory import Multiplicative, predict
    >>> from noiseprop.empirical import monte_carlo
    >>> g = torch.Generator().manual_seed(1)
    >>> net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    >>> x, y = torch.randn(50, 6, generator=g), torch.randint(0, 4, (50,), generator=g)
    >>> cells = compare_cells({eta: compare(predict(net, x, y, Multiplicative(eta)),
    ...                                     monte_carlo(net, x, y, Multiplicative(eta), draws=50, seed=0))
    ...                        for eta in (0.02, 0.05)})
    >>> cells.frame["cell"].nunique(), "tost_p_holm" in cells.frame
    (2, True)
    """
    if isinstance(comparisons, dict):
        labels = list(comparisons.keys())
        comparisons = list(comparisons.values())
    comparisons = list(comparisons)
    if not comparisons:
        raise ValueError("compare_cells needs at least one Comparison")
    if labels is None:
        labels = list(range(len(comparisons)))
    if len(labels) != len(comparisons):
        raise ValueError(f"{len(labels)} labels for {len(comparisons)} comparisons")
    alpha = comparisons[0].alpha if alpha is None else float(alpha)
    rows = []
    for lab, c in zip(labels, comparisons):
        if not isinstance(c, Comparison):
            raise TypeError(f"compare_cells takes Comparison objects, got {type(c).__name__} for cell {lab!r}")
        for q in c.quantities:
            rows.append(dict(cell=lab, **q.to_dict()))
    return combine_cells(pd.DataFrame(rows), alpha, confidence)


def combine_cells(frame: pd.DataFrame, alpha: float = 0.05, confidence: float = 0.95) -> CellComparison:
    """The across-cell part of :func:`compare_cells` on rows already tabulated (one row
    per cell × quantity, the columns of :meth:`Comparison.to_frame` plus any labels, as
    stored by the studies): Holm-adjusted TOST p-values within each quantity and the
    calibration regression of observed on predicted across cells (log scale for
    variances and the loss increase). The one validation path of the studies and the
    report.

    >>> rows = pd.DataFrame({"quantity": ["accuracy"] * 3, "predicted": [0.9, 0.8, 0.7],
    ...                      "observed": [0.91, 0.79, 0.70], "tost_p": [0.01, 0.02, 0.03]})
    >>> combine_cells(rows).frame["tost_p_holm"].round(2).tolist()
    [0.03, 0.04, 0.04]
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"combine_cells takes a DataFrame of per-cell rows, got {type(frame).__name__}")
    missing = [c for c in ("quantity", "predicted", "observed", "tost_p") if c not in frame.columns]
    if missing:
        raise ValueError(f"combine_cells: frame lacks the columns {missing} (rows of Comparison.to_frame())")
    frame = frame.copy()
    frame["tost_p_holm"] = np.nan
    frame["equivalent_holm"] = None
    cals = {}
    for q, idx in frame.groupby("quantity", sort=False).groups.items():
        adj, rej = holm(frame.loc[idx, "tost_p"].to_numpy(dtype=float), alpha)
        frame.loc[idx, "tost_p_holm"] = adj
        frame.loc[idx, "equivalent_holm"] = [bool(r) if np.isfinite(a) else None for r, a in zip(rej, adj)]
        sub = frame.loc[idx]
        cals[q] = calibration(sub["observed"].to_numpy(float), sub["predicted"].to_numpy(float),
                              log=_LOG_SCALE.get(q, False), confidence=confidence)
    return CellComparison(frame, cals, float(alpha))
