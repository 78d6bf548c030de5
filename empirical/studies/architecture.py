"""Study 1: architecture and depth (Fagbohungbe & Qian 2020, arXiv 2011.11840).

Source claims (abstract): under additive Gaussian noise on the weights of trained
models, "deeper models and models with more redundancy in design such as VGG are more
robust to the noise in general", and "the performance is also affected by the design
philosophy of the model".

Protocol: each architecture (default MLP, VGG-style, ResNet-20 and ResNet-32; the
ResNet family may be extended to 44 and 56) trained with several seeds; relative noise
``σ_l = η·std(W_l)`` on the Conv/Linear weights (BatchNorm digital) over the η grid,
common random numbers. Per model: the accuracy-vs-η curve (Monte-Carlo mean with its
interval) and the theory's predicted curve; the area under the curve (mean accuracy
over the η range), the normalised robustness (accuracy/clean averaged over η > 0) and
the η at which accuracy falls 10 points.

Tests (training seed as a factor everywhere):
- depth: OLS ``robustness ~ depth + C(seed)`` within the ResNet family (claim: slope > 0);
- redundancy: per seed, VGG's robustness minus the mean of the other architectures,
  paired t-test across seeds (claim: > 0);
- design matters: F-test of ``C(arch)`` in ``robustness ~ C(arch) + C(seed)`` (claim:
  the architectures differ), effect = range of the architecture means, Student-t CI
  with a bootstrap standard error over seeds (:func:`~.seed_stats.bootstrap_seed_t`);
- the ranking by area under the curve with a percentile bootstrap interval of each
  rank over seeds (descriptive: a rank is discrete, and with 4 seeds these intervals
  are narrow).
The same tests on the predicted curves say whether the theory predicts each claim.
"""
from __future__ import annotations

from dataclasses import replace as _replace

import numpy as np
import pandas as pd

from ..models import _family
from ..stats import Effect, ols_effect, paired_effect
from .common import (Finding, Grid, StudyPlan, StudyResult, bootstrap_seed_means, bootstrap_seed_t,
                     calibration_figure_frame, compare_frame, curve_frame, curves_figure_frame, diverged_notes,
                     finalise_findings, model_cells, model_frame, seed_matrix, seed_summary, validation_tables)
from .figures import Figure, THEORY_LINES
from .frames import excluded_frame

MECHANISM = ("per-layer gains: logit noise power per unit η² summed over layers; depth law of the first order (docs/THEORY.md §3)")
PAPER_NOTE = "the paper reports directions only (no effect size in its abstract)"
NAME = "architecture"
TITLE = "Study 1: architecture and depth"
SOURCE = "Fagbohungbe & Qian 2020 (arXiv 2011.11840)"
DEFAULT_MODELS = ("mlp", "vgg", "resnet8", "resnet20")


def default_norm(arch: str) -> str:
    """The published architectures: VGG and ResNets with BatchNorm, the MLP without."""
    return "none" if arch == "mlp" else "bn"


def plan(grid: Grid, models=DEFAULT_MODELS, norm: str | None = None, cache_dir=None) -> StudyPlan:
    """``norm``: one normalisation for every convolutional model (default BatchNorm,
    as published); the MLP has none unless ``norm`` is given."""
    if not models:
        raise ValueError("architecture study: give at least one model")
    tasks, rows = [], []
    for arch in models:
        nm = (norm if norm is not None and arch != "mlp" else default_norm(arch))
        for seed in grid.seeds:
            t, row = model_cells(NAME, grid, arch, norm=nm, seed=seed, cache_dir=cache_dir,
                                 factors={"depth": _depth_of(arch)})
            tasks += t
            rows.append(row)
    return StudyPlan(NAME, TITLE, tuple(tasks), pd.DataFrame(rows), {"models": list(models), "norm": norm})


def _depth_of(arch: str) -> int:
    return int(_family(arch, None)[1])


def _arch_label(r) -> str:
    return str(r["arch"])


def _rank_stat(frame: pd.DataFrame, arch: str, col: str = "auc") -> float:
    means = frame.groupby("arch")[col].mean().sort_values(ascending=False)
    return float(list(means.index).index(arch) + 1) if arch in means.index else float("nan")


def analyse(p: StudyPlan, results: dict, grid: Grid) -> StudyResult:
    alpha, conf = grid.alpha, grid.confidence
    mf = model_frame(p, results, grid)
    mf = mf[mf["variant"] == "digital"].reset_index(drop=True)
    curves = curve_frame(p, results, grid)
    curves = curves[curves["variant"] == "digital"].reset_index(drop=True)
    comp = compare_frame(p, results, grid)
    cols = ["clean_accuracy", "auc", "robustness", "eta10", "pred_auc", "pred_robustness", "pred_eta10"]
    summ = seed_summary(mf.replace([np.inf], np.nan), ["arch"], cols, conf)
    # the ranking by area under the curve, with bootstrap intervals over seeds
    levels, M = seed_matrix(mf, "auc", "arch")
    ranks = []
    for j, arch in enumerate(levels):
        rank_j = lambda means, j=j: 1 + np.sum(means > means[:, [j]], axis=1)  # noqa: E731
        lo, hi, _ = bootstrap_seed_means(M, rank_j, n_resamples=2000, seed=1, confidence=conf)
        ranks.append({"arch": arch, "rank": _rank_stat(mf, arch), "rank_ci_low": lo, "rank_ci_high": hi,
                      "pred_rank": _rank_stat(mf, arch, "pred_auc")})
    summ = summ.merge(pd.DataFrame(ranks), on="arch").sort_values("rank").reset_index(drop=True)
    summ["eta10_censored"] = [int(np.isinf(mf[mf["arch"] == a]["eta10"]).sum()) for a in summ["arch"]]

    findings = []
    theory_ok = mf["pred_robustness"].notna().all()
    # depth within the ResNet family
    rn = mf[mf["family"] == "resnet"]
    if rn["depth"].nunique() >= 2:
        findings.append(_ols_finding(rn, "robustness ~ depth + C(seed)", "depth",
                                     "deeper ResNets are more robust (normalised accuracy averaged over η rises "
                                     "with depth)", +1, theory_ok, "per layer of depth"))
    # redundancy: VGG against the mean of the others
    if (mf["family"] == "vgg").any() and (mf["family"] != "vgg").any():
        findings.append(_vgg_finding(mf, conf, theory_ok))
    # design matters: omnibus over architectures
    if mf["arch"].nunique() >= 2:
        findings.append(_omnibus_finding(mf, conf, theory_ok))
    findings = finalise_findings([_replace(f, mechanism=MECHANISM, paper_note=PAPER_NOTE) for f in findings], alpha)

    comp_cells, validation = validation_tables(comp, alpha, conf)
    figs = [
        Figure("architecture_curves", "Accuracy vs relative noise η per architecture: Monte-Carlo mean over "
               f"seeds with its {int(conf * 100)}% band across seeds (solid) and the theory's predicted curve "
               "(" + THEORY_LINES + "); BatchNorm digital.", "curves", curves_figure_frame(curves, _arch_label, conf),
               {"ylabel": "accuracy"}),
        Figure("architecture_calibration", "Predicted vs Monte-Carlo accuracy for every model and noise level "
               "(bars: Student-t interval of the Monte-Carlo mean over draws).", "calibration",
               calibration_figure_frame(comp, "accuracy", _arch_label), {}),
        Figure("architecture_auc", "Area under the accuracy-vs-η curve (mean accuracy over the η range) per "
               f"architecture, mean over seeds with {int(conf * 100)}% interval.", "bars",
               summ.rename(columns={"arch": "group", "auc": "value", "auc_ci_low": "ci_low",
                                    "auc_ci_high": "ci_high"})[["group", "value", "ci_low", "ci_high"]],
               {"ylabel": "area under curve"}),
    ]
    tables = {"architecture_models": mf, "architecture_summary": summ, "architecture_curves": curves,
              "architecture_compare": comp_cells, "architecture_validation": validation}
    notes = _theory_notes(mf) + diverged_notes(p, results, grid)
    tables["architecture_training"] = excluded_frame(p, results, grid)
    return StudyResult(NAME, TITLE, dict(p.params, **grid.to_dict()), tables, tuple(findings), tuple(notes),
                       figures=tuple(figs))


def _theory_notes(mf: pd.DataFrame) -> list[str]:
    errs = sorted(set(e for e in mf.get("theory_error", pd.Series(dtype=str)) if e))
    out = [f"theory unavailable for some models: {e}" for e in errs]
    errs = sorted(set(e for e in mf.get("mechanism_error", pd.Series(dtype=str)) if e))
    out += [f"mechanisms unavailable for some models: {e}" for e in errs]
    return out


def _ols_finding(frame, formula, term, claim, sign, theory_ok, unit) -> Finding:
    eff, _ = _safe_ols(frame, formula, term, unit)
    teff = None
    if theory_ok:
        teff, _ = _safe_ols(frame, formula.replace("robustness", "pred_robustness", 1), term, unit)
    return Finding(NAME, claim, SOURCE, "direction", eff, expected_sign=sign, theory_effect=teff)


def _safe_ols(frame, formula, term, unit):
    try:
        return ols_effect(frame, formula, term, unit=unit)
    except Exception as e:  # noqa: BLE001 - too few rows for the model: no test
        nan = float("nan")
        return Effect(term, nan, nan, nan, nan, int(len(frame)), f"OLS {formula} (not estimable: {e})"), None


def _vgg_finding(mf, conf, theory_ok) -> Finding:
    def per_seed(col):
        v = mf[mf["family"] == "vgg"].groupby("seed")[col].mean()
        o = mf[mf["family"] != "vgg"].groupby("seed")[col].mean()
        idx = v.index.intersection(o.index).sort_values()
        return v.loc[idx].to_numpy(float), o.loc[idx].to_numpy(float)

    a, b = per_seed("robustness")
    eff = paired_effect(a, b, "VGG − mean of the others", conf, unit="normalised accuracy")
    teff = paired_effect(*per_seed("pred_robustness"), "VGG − others (predicted)", conf) if theory_ok else None
    return Finding(NAME, "VGG (more redundancy) is more robust than the other architectures", SOURCE, "direction",
                   eff, expected_sign=+1, theory_effect=teff)


def _omnibus(frame, col):
    import statsmodels.formula.api as smf  # lazy: statsmodels adds ~2 s (measured) to importing the studies
    from statsmodels.stats.anova import anova_lm

    f = frame.assign(y=frame[col])
    formula = "y ~ C(arch) + C(seed)" if frame["seed"].nunique() > 1 else "y ~ C(arch)"
    res = smf.ols(formula, data=f).fit()
    if res.df_resid <= 0:
        return float("nan")
    tab = anova_lm(res, typ=2)
    return float(tab.loc["C(arch)", "PR(>F)"])


def _omnibus_finding(mf, conf, theory_ok) -> Finding:
    def effect(col, name):
        means = mf.groupby("arch")[col].mean()
        est = float(means.max() - means.min())
        _, M = seed_matrix(mf, col, "arch")
        bt = bootstrap_seed_t(M, lambda m: np.nanmax(m, axis=1) - np.nanmin(m, axis=1), est, n_resamples=2000,
                              seed=2, confidence=conf)
        try:
            p = _omnibus(mf, col)
        except Exception:  # noqa: BLE001
            p = float("nan")
        return Effect(name, est, bt["ci_low"], bt["ci_high"], p, int(len(mf)),
                      "F-test of C(arch) in OLS y ~ C(arch) + C(seed); effect: range of architecture means, "
                      f"Student-t CI with a bootstrap s.e. over seeds (df {int(bt['df'])})", df=bt["df"], se=bt["se"],
                      unit="normalised accuracy", confidence=conf)

    eff = effect("robustness", "range over architectures")
    teff = effect("pred_robustness", "range (predicted)") if theory_ok else None
    return Finding(NAME, "robustness depends on the architecture (design philosophy)", SOURCE, "direction", eff,
                   expected_sign=+1, theory_effect=teff)
