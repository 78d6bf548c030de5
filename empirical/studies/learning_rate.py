"""Study 3: learning rate, flatness and noise robustness (Fagbohungbe & Qian 2022,
arXiv 2205.07856).

Source claim (abstract): "there exists a sweet spot of learning rate values that
achieves a good balance between model prediction performance and model noise-resistant
property". Theory (docs/THEORY.md §5, §6): SGD settles where the sharpness is near the
linear-stability bound ``2/lr`` (``2(1+β)/lr`` with heavy-ball momentum β; Cohen et al.
2021), so larger learning rates select flatter minima (derivations ``learning_rate.stability``
and ``learning_rate.sweet_spot``); the first-order loss increase
under noise is ``½ tr(Σ_ε H)``; clean accuracy degrades near the largest stable lr.

Protocol: one architecture (default: the MLP without normalisation, whose sharpness is
not confounded by BatchNorm's scale invariance and is cheap to measure on two cores;
``arch="vgg"`` for the CNN), trained with a constant
learning rate (after warm-up) at ≥ 6 learning rates over two decades, ≥ 3 seeds each.
Per model: clean accuracy; the accuracy-vs-η curve and its area (mean accuracy over the
η range: performance and noise resistance in one number); normalised robustness; the
top Hessian eigenvalue of the training loss and ``tr(Σ_ε H)`` (η = 1).

Tests (seed as a factor):
- sweet spot: the best interior learning rate against the better end of the range, on
  the area under the accuracy-vs-η curve (claim: > 0), bootstrap over seeds that redoes
  the choice of the best rate; its location ``lr*`` (parabolic peak interpolation) with
  a bootstrap interval over seeds; a global quadratic in log lr (with Fieller's
  interval for its vertex) is reported beside it;
- sharpness falls with the learning rate: OLS ``log λ_max ~ log lr + C(seed)``
  (claim: slope < 0; the edge-of-stability value is −1);
- sharpness below the stability bound: per seed, the mean over learning rates of
  ``log(λ_max·lr / (2(1+β)))``, t-test across seeds (claim: < 0);
- robustness rises with the learning rate: OLS ``robustness ~ log10 lr + C(seed)``;
- flatness predicts robustness: OLS ``robustness ~ log tr(Σ_ε H) + C(seed)`` (claim < 0).
The symbolic sweet-spot model (:mod:`noiseprop.theory.symbolic`, topic learning_rate),
when available, gives ``lr*`` in closed form from parameters fitted to the
measurements; it is set beside the empirical interval.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import replace as _replace

import numpy as np
import pandas as pd
from scipy import stats as st

from noiseprop.theory.symbolic.learning_rate import lr_sweet_spot

from . import CPU_SCALE_DATASETS
from ..stats import Effect, ols_effect, paired_effect
from ..train import default_train_config
from .architecture import _theory_notes
from .common import (Finding, Grid, StudyPlan, StudyResult, bootstrap_seed_t, calibration_figure_frame,
                     compare_frame, curve_frame, curves_figure_frame, diverged_notes, finalise_findings, model_cells,
                     model_frame, seed_matrix, seed_summary, validation_tables)
from .figures import Figure, THEORY_LINES
from .frames import excluded_frame

MECHANISM = ("sharpness ≈ 2/lr (edge of stability) and the loss increase ½η² tr(Σ_ε H): flatter minima lose less")
PAPER_NOTE = "the paper reports a sweet spot (no effect size in its abstract)"
NAME = "learning_rate"
TITLE = "Study 3: learning rate"
SOURCE = "Fagbohungbe & Qian 2022 (arXiv 2205.07856)"
EOS = "Cohen et al. 2021 (edge of stability); docs/THEORY.md §6"
FLAT = "docs/THEORY.md §5 (E[ΔL] = ½ tr(Σ_ε H))"
DEFAULT_ARCH = "mlp"
DEFAULT_NORM = "none"


def default_lrs(arch: str, norm: str, dataset: str, n: int = 6) -> list[float]:
    """``n`` learning rates log-spaced over two decades, from the family default
    ``lr0`` (:func:`noiseprop.empirical.train.default_train_config`):
    ``lr0·10^[−1.3, 0.7]``, i.e. from strong under-training at the fixed epoch budget
    to 5·lr0, just below the largest rate at which the default MLP still trains on
    digits (at 8·lr0 = 0.4 it stays at chance; measured with constant lr, momentum 0.9,
    6 epochs)."""
    lr0 = default_train_config(arch, norm=norm, dataset=dataset)["lr"]
    return [float(f"{v:.3g}") for v in lr0 * np.logspace(-1.3, 0.7, n)]


def plan(grid: Grid, arch: str | None = None, norm: str = DEFAULT_NORM, lrs=None, schedule: str = "constant",
         cache_dir=None) -> StudyPlan:
    """``arch``: default the MLP on the CPU-scale datasets, the VGG-style CNN otherwise."""
    if arch is None:
        arch = DEFAULT_ARCH if grid.dataset in CPU_SCALE_DATASETS else "vgg"
    lrs = default_lrs(arch, norm, grid.dataset) if lrs is None else [float(v) for v in lrs]
    if len(lrs) < 2 or any(v <= 0 for v in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"learning_rate study: give at least two distinct positive learning rates, got {lrs!r}")
    lrs = sorted(lrs)
    tasks, rows = [], []
    for lr in lrs:
        for seed in grid.seeds:
            t, row = model_cells(NAME, grid, arch, norm=norm, seed=seed, cache_dir=cache_dir,
                                 train_overrides={"lr": lr, "schedule": schedule})
            tasks += t
            rows.append(row)
    momentum = default_train_config(arch, norm=norm, dataset=grid.dataset)["momentum"]
    return StudyPlan(NAME, TITLE, tuple(tasks), pd.DataFrame(rows),
                     {"arch": arch, "norm": norm, "lrs": lrs, "schedule": schedule, "momentum": momentum,
                      "decades": float(math.log10(max(lrs) / min(lrs)))})


def _quad_fit(frame: pd.DataFrame, col: str, center: float):
    """(fit, curvature, linear, vertex log10 lr) of OLS ``col ~ x + x² + C(seed)``."""
    import statsmodels.formula.api as smf  # lazy: statsmodels adds ~2 s (measured) to importing the studies

    f = frame.assign(x=np.log10(frame["lr"].astype(float)) - center, y=frame[col].astype(float))
    formula = "y ~ x + I(x**2)" + (" + C(seed)" if f["seed"].nunique() > 1 else "")
    res = smf.ols(formula, data=f).fit()
    c, b = float(res.params["I(x ** 2)"]), float(res.params["x"])
    vertex = -b / (2 * c) + center if c < 0 else float("nan")
    return res, c, b, vertex


def fieller_vertex(res, center: float, confidence: float) -> tuple[float, float]:
    """Fieller's interval for the vertex ``x* = −b/(2c)`` of the fitted quadratic:
    ``{θ : (b + 2cθ)² ≤ t² Var(b + 2cθ)}`` with the OLS covariance of ``(b, c)``
    (Fieller 1954; exact for normal errors). Bounded only when the curvature is
    significantly non-zero; otherwise ``(nan, nan)``."""
    b, c = float(res.params["x"]), float(res.params["I(x ** 2)"])
    V = res.cov_params()
    vbb, vcc, vbc = float(V.loc["x", "x"]), float(V.loc["I(x ** 2)", "I(x ** 2)"]), float(V.loc["x", "I(x ** 2)"])
    t2 = float(st.t.ppf(0.5 + confidence / 2, res.df_resid)) ** 2
    A = 4 * (c * c - t2 * vcc)
    B = 4 * (b * c - t2 * vbc)
    C = b * b - t2 * vbb
    disc = B * B - 4 * A * C
    if A <= 0 or disc < 0:
        return float("nan"), float("nan")
    r = math.sqrt(disc)
    lo, hi = sorted(((-B - r) / (2 * A), (-B + r) / (2 * A)))
    return lo + center, hi + center


def interior_gain(means: np.ndarray) -> np.ndarray:
    """For each row of per-lr means (``[R, lrs]``, sorted by lr): the best interior
    value minus the better of the two edges. Positive: an interior learning rate beats
    both ends of the range (a sweet spot inside it); negative: an edge is best."""
    return np.nanmax(means[:, 1:-1], axis=1) - np.nanmax(means[:, [0, -1]], axis=1)


def peak_location(means: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Location (log10 lr) of the maximum of each row of per-lr means: the vertex of
    the parabola through the argmax and its two neighbours (standard parabolic peak
    interpolation), clipped to that bracket; an edge argmax gives the edge."""
    R, L = means.shape
    j = np.nanargmax(means, axis=1)
    out = x[j].astype(float)
    inner = (j > 0) & (j < L - 1)
    if inner.any():
        jj = j[inner]
        rows = np.arange(R)[inner]
        y0, y1, y2 = means[rows, jj - 1], means[rows, jj], means[rows, jj + 1]
        x0, x1, x2 = x[jj - 1], x[jj], x[jj + 1]
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        A = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
        B = (x2 ** 2 * (y0 - y1) + x1 ** 2 * (y2 - y0) + x0 ** 2 * (y1 - y2)) / den
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(A < 0, -B / (2 * A), x1)
        out[inner] = np.clip(v, x0, x2)
    return out


def _sweet_spot(mf, col, conf, lrs, n_resamples: int = 4000):
    """The sweet-spot test and its location.

    Test (no functional form assumed): ``T`` = the best interior per-lr mean of
    ``col`` (over seeds) minus the better of the two edges; Student-t interval and
    two-sided test with the standard error of a bootstrap over training seeds, which
    redoes the selection of the best learning rate in every resample
    (:func:`~.seed_stats.bootstrap_seed_t`, df = seeds − 1; the percentile interval and
    bootstrap p-value used before were too narrow at 4 seeds: p = 0.00025, the
    resampling floor, where this test gives 0.017). ``T > 0`` significantly: a sweet
    spot inside the range; ``T < 0`` significantly: the best learning rate is at an
    edge (no sweet spot in the range). Location ``lr*``: parabolic interpolation of the
    peak of the mean curve (in log10 lr), with the same interval. For reference, the vertex of a
    global quadratic in log lr with seed effects, and Fieller's interval for it."""
    levels, M = seed_matrix(mf, col, "lr")
    x = np.log10(np.asarray(levels, float))
    mean_curve = np.nanmean(M, axis=0)[None]
    t_hat = float(interior_gain(mean_curve)[0])
    bt = bootstrap_seed_t(M, interior_gain, t_hat, n_resamples=n_resamples, seed=3, confidence=conf)
    lo, hi, p = bt["ci_low"], bt["ci_high"], bt["p"]
    eff = Effect("best interior − best edge", t_hat, lo, hi, p, int(M.shape[0]),
                 f"t test over seeds of max_interior − max_edges of the mean {col} per lr (bootstrap s.e. over "
                 f"seeds, df {int(bt['df'])})", df=bt["df"], se=bt["se"], unit="accuracy", confidence=conf)
    loc = float(peak_location(mean_curve, x)[0])
    bl = bootstrap_seed_t(M, lambda m: peak_location(m, x), loc, n_resamples=n_resamples, seed=5, confidence=conf)
    llo, lhi = bl["ci_low"], bl["ci_high"]
    info = {"lr_star": 10 ** loc, "lr_star_ci_low": 10 ** llo if np.isfinite(llo) else np.nan,
            "lr_star_ci_high": 10 ** lhi if np.isfinite(lhi) else np.nan,
            "interior_gain": t_hat, "interior_gain_ci_low": lo, "interior_gain_ci_high": hi, "interior_gain_p": p,
            "best_lr_observed": float(levels[int(np.nanargmax(mean_curve[0]))])}
    center = float(np.mean(x))
    try:
        res, c, b, vertex = _quad_fit(mf, col, center)
        flo, fhi = fieller_vertex(res, center, conf) if c < 0 else (float("nan"), float("nan"))
        info.update(quadratic_curvature=c, quadratic_curvature_p=float(res.pvalues["I(x ** 2)"]),
                    quadratic_vertex_lr=10 ** vertex if np.isfinite(vertex) else np.nan,
                    quadratic_fieller_ci_low=10 ** flo if np.isfinite(flo) else np.nan,
                    quadratic_fieller_ci_high=10 ** fhi if np.isfinite(fhi) else np.nan)
    except Exception:  # noqa: BLE001 - too few rows for the quadratic: reference fit omitted
        pass
    return eff, info


def _ols(frame, formula, term, unit=""):
    try:
        return ols_effect(frame, formula, term, unit=unit)[0]
    except Exception as e:  # noqa: BLE001
        nan = float("nan")
        return Effect(term, nan, nan, nan, nan, int(len(frame)), f"OLS {formula} (not estimable: {e})")


_P_GRID = np.geomspace(0.05, 5.0, 120)


def fit_clean_loss(lr: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares fit of ``L_0 + a lr^p`` (``a, L_0 ≥ 0``, ``p`` on a log grid over
    [0.05, 5]) to each row of ``loss`` (``[R, lrs]``): for each ``p`` the fit is
    linear; the ``p`` of smallest residual wins. Returns ``(L_0, a, p)``, each ``[R]``;
    ``a = 0`` when the loss does not rise with the learning rate."""
    loss = np.atleast_2d(loss)
    R = loss.shape[0]
    best = np.full(R, np.inf)
    out = np.zeros((R, 3))
    for pw in _P_GRID:
        z = lr ** pw
        zc = z - z.mean()
        a = (loss - loss.mean(1, keepdims=True)) @ zc / (zc @ zc)
        a = np.clip(a, 0.0, None)
        L0 = np.clip(loss.mean(1) - a * z.mean(), 0.0, None)
        sse = ((loss - L0[:, None] - a[:, None] * z) ** 2).sum(1)
        better = sse < best
        best[better] = sse[better]
        out[better] = np.column_stack([L0, a, np.full(R, pw)])[better]
    return out[:, 0], out[:, 1], out[:, 2]


def fit_noise_loss(lr: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``b lr^(−q)`` by least squares on the log scale, for each row of ``noise``
    (``[R, lrs]``; NaN where a value is not positive). Returns ``(b, q)``."""
    noise = np.atleast_2d(noise)
    x = np.log(lr)
    xc = x - x.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(noise > 0, np.log(noise), np.nan)
    slope = (y - y.mean(1, keepdims=True)) @ xc / (xc @ xc)
    icpt = y.mean(1) - slope * x.mean()
    return np.exp(icpt), -slope


def _sweet_spot_model(lr, clean, noise):
    """Closed-form ``lr*`` of the derivation for the terms fitted to each row of
    ``clean`` and ``noise``."""
    d = lr_sweet_spot()
    L0, a, p = fit_clean_loss(lr, clean)
    b, q = fit_noise_loss(lr, noise)
    ok = np.isfinite(b) & np.isfinite(q) & (a > 0) & (b > 0) & (q > 0)
    with np.errstate(all="ignore"):
        star = np.where(ok, d.numeric("lr_opt")(a=np.where(ok, a, 1.0), b=np.where(ok, b, 1.0), p=p,
                                                 q=np.where(ok, q, 1.0)), np.nan)
    return dict(L_0=L0, a=a, p=p, b=b, q=q, lr_star=star, ok=ok)


def symbolic_sweet_spot(mf: pd.DataFrame, lrs, confidence: float):
    """The symbolic sweet-spot model (``theory.symbolic.learning_rate.lr_sweet_spot``):
    ``J(lr) = L_0 + a lr^p + b lr^(−q)`` with the clean-loss term fitted to the per-lr
    mean clean loss and the noise term to the mean Monte-Carlo loss increase averaged
    over η > 0; its closed-form ``lr* = (q b/(p a))^(1/(p+q))`` with a bootstrap interval
    over seeds, and whether the model's existence condition holds on the tested range."""
    levels, C = seed_matrix(mf, "clean_loss", "lr")
    _, N = seed_matrix(mf, "noise_loss", "lr")
    lr = np.asarray(levels, float)
    with np.errstate(all="ignore"):
        fit = _sweet_spot_model(lr, np.nanmean(C, 0)[None], np.nanmean(N, 0)[None])
    out = {k: float(v[0]) for k, v in fit.items() if k != "ok"}
    out["exists"] = bool(fit["ok"][0]) and bool(lr_sweet_spot().numeric("sweet_spot_exists")(
        a=out["a"], b=out["b"], p=out["p"], q=out["q"], lr_min=min(lrs), lr_max=max(lrs)))
    rng = np.random.default_rng(4)
    idx = rng.integers(0, C.shape[0], size=(1000, C.shape[0]))
    # a resample holding only excluded seeds (NaN) of one learning rate has no mean there:
    # its lr* is NaN and is dropped below (bootstrap_defined says how often)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        stars = _sweet_spot_model(lr, np.nanmean(C[idx], 1), np.nanmean(N[idx], 1))["lr_star"]
    ok = stars[np.isfinite(stars)]
    a = (1 - confidence) / 2
    lo, hi = (float(np.quantile(ok, a)), float(np.quantile(ok, 1 - a))) if ok.size >= 500 else (np.nan, np.nan)
    out.update(lr_star_ci_low=lo, lr_star_ci_high=hi, bootstrap_defined=float(ok.size / 1000))
    return out


def analyse(p: StudyPlan, results: dict, grid: Grid) -> StudyResult:
    alpha, conf = grid.alpha, grid.confidence
    lrs = p.params["lrs"]
    beta = float(p.params.get("momentum", 0.9))
    mf = model_frame(p, results, grid)
    mf = mf[mf["variant"] == "digital"].reset_index(drop=True)
    mf["log10_lr"] = np.log10(mf["lr"].astype(float))
    mf["log_lr"] = np.log(mf["lr"].astype(float))
    mf["log_sharpness"] = np.log(mf["top_eigenvalue"].astype(float))
    mf["log_trace"] = np.log(mf["trace_digital"].astype(float))
    mf["sharpness_x_lr_over_2"] = mf["top_eigenvalue"] * mf["lr"] / 2
    mf["log_stability_ratio"] = np.log(mf["top_eigenvalue"] * mf["lr"] / (2 * (1 + beta)))
    if "noise_loss" not in mf.columns:
        mf["noise_loss"] = np.nan
    curves = curve_frame(p, results, grid)
    curves = curves[curves["variant"] == "digital"].reset_index(drop=True)
    comp = compare_frame(p, results, grid)
    theory_ok = mf["pred_auc"].notna().all()
    seedf = " + C(seed)" if mf["seed"].nunique() > 1 else ""
    findings = []

    eff, info = _sweet_spot(mf, "auc", conf, lrs)
    teff, tinfo = _sweet_spot(mf, "pred_auc", conf, lrs) if theory_ok else (None, {})
    note = (f"lr* = {info.get('lr_star', float('nan')):.3g}, {int(conf * 100)}% CI over seeds "
            "(Student-t, bootstrap s.e.) "
            f"[{info.get('lr_star_ci_low', float('nan')):.3g}, {info.get('lr_star_ci_high', float('nan')):.3g}] "
            f"(tested range [{min(lrs):.3g}, {max(lrs):.3g}]); best observed lr {info.get('best_lr_observed', float('nan')):.3g}")
    findings.append(Finding(NAME, "a sweet spot of the learning rate maximises accuracy under noise (an interior "
                            "learning rate beats both ends of the range on the area under the accuracy-vs-η curve)",
                            SOURCE, "direction", eff, expected_sign=+1, theory_effect=teff, note=note))
    findings.append(Finding(NAME, "sharpness (top Hessian eigenvalue) falls as the learning rate rises", EOS,
                            "direction", _ols(mf, f"log_sharpness ~ log_lr{seedf}", "log_lr", "log λ per log lr"),
                            expected_sign=-1))
    per_seed = mf.groupby("seed")["log_stability_ratio"].mean().to_numpy(float)
    per_seed = per_seed[np.isfinite(per_seed)]
    if per_seed.size >= 2:
        e = paired_effect(per_seed, np.zeros_like(per_seed), "mean log(λ·lr/(2(1+β)))", conf, unit="log")
        e = Effect(e.name, e.estimate, e.ci_low, e.ci_high, e.p_value, e.n,
                   "t-test across seeds of the mean over lrs of log(λ_max·lr/(2(1+β)))", df=e.df, se=e.se,
                   standardized=e.standardized, unit="log", confidence=conf)
        findings.append(Finding(NAME, f"sharpness stays below the stability bound 2(1+β)/lr (β = {beta:g})", EOS,
                                "direction", e, expected_sign=-1))
    findings.append(Finding(NAME, "robustness (normalised accuracy averaged over η) rises with the learning rate",
                            SOURCE, "direction", _ols(mf, f"robustness ~ log10_lr{seedf}", "log10_lr", "per decade"),
                            expected_sign=+1,
                            theory_effect=_ols(mf, f"pred_robustness ~ log10_lr{seedf}", "log10_lr", "per decade")
                            if theory_ok else None))
    findings.append(Finding(NAME, "flatter minima (smaller tr(Σ_ε H)) are more robust", FLAT, "direction",
                            _ols(mf, f"robustness ~ log_trace{seedf}", "log_trace", "per log trace"), expected_sign=-1,
                            theory_effect=_ols(mf, f"pred_robustness ~ log_trace{seedf}", "log_trace", "per log trace")
                            if theory_ok else None))
    findings = finalise_findings([_replace(f, mechanism=MECHANISM, paper_note=PAPER_NOTE) for f in findings], alpha)
    cols = ["clean_accuracy", "clean_loss", "noise_loss", "auc", "robustness", "top_eigenvalue",
            "sharpness_x_lr_over_2", "trace_digital", "pred_auc", "pred_robustness", "log_sharpness", "log_trace"]
    summ = seed_summary(mf, ["lr"], cols, conf).sort_values("lr").reset_index(drop=True)
    for c, src in (("geo_top_eigenvalue", "log_sharpness"), ("geo_trace_digital", "log_trace")):
        for suf in ("", "_ci_low", "_ci_high"):  # geometric mean and interval (t on the log scale)
            summ[c + suf] = np.exp(summ[src + suf])
    summ["two_over_lr"] = 2 / summ["lr"]
    summ["stability_bound"] = 2 * (1 + beta) / summ["lr"]
    sweet = pd.DataFrame([dict(info, which="measured"), dict(tinfo, which="theory (predicted curves)")])
    sym = symbolic_sweet_spot(mf, lrs, conf)
    notes = []
    sweet = pd.concat([sweet, pd.DataFrame([dict(sym, which="symbolic model (fitted terms)")])],
                      ignore_index=True)
    lo_m, hi_m = info.get("lr_star_ci_low", float("nan")), info.get("lr_star_ci_high", float("nan"))
    where = ("inside" if np.isfinite(lo_m) and lo_m <= sym["lr_star"] <= hi_m else "outside") \
        if np.isfinite(sym["lr_star"]) and np.isfinite(lo_m) else "not comparable (an interval is undefined)"
    notes.append(
        f"symbolic sweet-spot model J = L0 + a·lr^p + b·lr^-q fitted to the measurements: a={sym['a']:.3g}, "
        f"p={sym['p']:.3g}, b={sym['b']:.3g}, q={sym['q']:.3g} (edge of stability predicts q = 1); closed-form "
        f"lr* = {sym['lr_star']:.3g} (bootstrap CI [{sym['lr_star_ci_low']:.3g}, {sym['lr_star_ci_high']:.3g}]); "
        f"existence condition on the tested range: {'holds' if sym['exists'] else 'fails'}; model lr* is "
        f"{where} the measured interval.")

    lrfig = []
    for col, panel, series in (("clean_accuracy", "accuracy", "clean"), ("auc", "accuracy", "mean over η (MC)"),
                               ("pred_auc", "accuracy", "mean over η (theory)"),
                               ("geo_top_eigenvalue", "sharpness", "top eigenvalue (geometric mean)"),
                               ("geo_trace_digital", "tr(Σ_ε H) at η = 1", "tr(Σ_ε H) (geometric mean)"),
                               ("robustness", "normalised robustness", "MC"),
                               ("pred_robustness", "normalised robustness", "theory")):
        lrfig.append(pd.DataFrame({"lr": summ["lr"], "series": series, "value": summ[col],
                                   "ci_low": summ[f"{col}_ci_low"], "ci_high": summ[f"{col}_ci_high"],
                                   "panel": panel}))
    figs = [
        Figure("learning_rate_sharpness", "Clean accuracy, accuracy under noise, sharpness and tr(Σ_ε H) against "
               f"the learning rate (mean over seeds with {int(conf * 100)}% band); dotted: 2/lr and the momentum "
               "stability bound 2(1+β)/lr.", "lr", pd.concat(lrfig, ignore_index=True),
               {"reference": {"sharpness": [("2/lr", 2.0), ("2(1+β)/lr", 2.0 * (1 + beta))]},
                "logy": ["sharpness", "tr(Σ_ε H) at η = 1"]}),
        Figure("learning_rate_curves", "Accuracy vs η per learning rate: Monte-Carlo mean over seeds with band "
               "(solid); " + THEORY_LINES + ".", "curves", curves_figure_frame(curves, lambda r: f"lr {r['lr']:.3g}", conf),
               {"ylabel": "accuracy"}),
        Figure("learning_rate_calibration", "Predicted vs Monte-Carlo accuracy, every model and η.", "calibration",
               calibration_figure_frame(comp, "accuracy", lambda r: f"lr {r['lr']:.3g}"), {}),
    ]
    comp_cells, validation = validation_tables(comp, alpha, conf)
    tables = {"learning_rate_models": mf, "learning_rate_summary": summ, "learning_rate_sweet_spot": sweet,
              "learning_rate_curves": curves, "learning_rate_compare": comp_cells,
              "learning_rate_validation": validation}
    tables["learning_rate_training"] = excluded_frame(p, results, grid)
    return StudyResult(NAME, TITLE, dict(p.params, **grid.to_dict()), tables, tuple(findings),
                       tuple(notes + _theory_notes(mf) + diverged_notes(p, results, grid)), figures=tuple(figs))
