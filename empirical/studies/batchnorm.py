"""Study 2: BatchNorm and noise robustness (Fagbohungbe & Qian 2022, IEEE Access,
arXiv 2205.07372).

Source claims (abstract and docs/THEORY.md §4): "the presence of batch normalization layer
negatively impacts noise resistant property of deep learning model and the impact grows
with the increase of the number of batch normalization layers" (CIFAR-10 average
normalised accuracy with vs without BN: ResNet44 41.32% vs 91.95%, VGG16 10.75% vs
93.80%).

Protocol: each architecture (default VGG-style and ResNet-20) without BatchNorm, with it
in the first ``k`` eligible places only, and with it everywhere; several seeds. Noise
``σ_l = η·std(W_l)`` on the Conv/Linear weights with BatchNorm kept digital
("digital"), and on the weights after folding BatchNorm into them ("folded", how a
crossbar stores it), common random numbers. Robustness = the normalised accuracy
(noisy/clean) averaged over η > 0, as in the source paper.

Tests, per architecture and noise placement (seed as a factor):
- with BatchNorm everywhere vs without: paired t-test across seeds (claim: < 0);
- OLS ``robustness ~ n_bn + C(seed)`` over the k grid (claim: slope < 0).
The same tests on the predicted robustness say whether the theory predicts them.

Mechanisms measured side by side (docs/THEORY.md §4, §5): the folding amplification
(mean over channels of the relative-noise variance inflation ``(std(W')/(a_c std W))²``,
geometric mean over folded layers), ``tr(Σ_ε H)`` for noise on unfolded and on folded
weights at η = 1 (the first-order loss increase is ``½ η² tr(Σ_ε H)``), the top Hessian
eigenvalue, and the sum of per-layer gains (logit noise power per unit η², relative to
the clean logit spread). Each is compared between BatchNorm everywhere and none (paired
across seeds, log scale), and associated with robustness across all models
(OLS ``robustness ~ log(mechanism) + C(arch) + C(seed)``), Holm-corrected.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ..models import _family, norm_places
from ..stats import Effect, holm, ols_effect, paired_effect
from .architecture import _theory_notes
from .common import (Finding, Grid, StudyPlan, StudyResult, calibration_figure_frame, compare_frame, curve_frame,
                     curves_figure_frame, diverged_notes, finalise_findings, layer_gain_frame, model_cells,
                     model_frame, seed_paired, seed_summary, validation_tables)
from .figures import Figure, THEORY_LINES
from .frames import excluded_frame

NAME = "batchnorm"
TITLE = "Study 2: BatchNorm"
SOURCE = "Fagbohungbe & Qian 2022 (arXiv 2205.07372)"
DEFAULT_ARCHS = ("vgg", "resnet20")
DEFAULT_KS = (0, 1, None)

MECHANISMS = {
    "folding_inflation": "folding amplification (variance inflation, geo-mean over layers)",
    "folding_inflation_lognormal": "theory: log-normal closed form from the spread of BN gains",
    "trace_digital": "tr(Σ_ε H), noise on unfolded weights (η = 1)",
    "trace_folded": "tr(Σ_ε H), noise on folded weights (η = 1)",
    "top_eigenvalue": "top Hessian eigenvalue",
    "layer_gain_total": "sum of per-layer gains",
}


#: The paper's own numbers (docs/THEORY.md §4): CIFAR-10 average normalised accuracy with BN
#: minus without, per family, in the unit of our robustness (normalised accuracy).
PAPER_EFFECTS = {"vgg": (0.1075 - 0.9380, "VGG-16 on CIFAR-10: 10.75% with BN vs 93.80% without"),
                 "resnet": (0.4132 - 0.9195, "ResNet-44 on CIFAR-10: 41.32% with BN vs 91.95% without")}
MECHANISM = ("folding inflation: noise on W' = diag(a)W is inflated by std(W')/(|a_c| std W) per channel; "
             "loss increase ½η² tr(Σ_ε H)")


def _with_paper(f: Finding) -> Finding:
    """Attach the paper's effect (all vs none) or what it says (the count law)."""
    arch = f.claim.split(",")[0]
    fam = _family(arch, None)[0]
    if "(all vs none)" in f.claim and fam in PAPER_EFFECTS:
        eff, note = PAPER_EFFECTS[fam]
        return replace(f, paper_effect=float(eff), paper_note=note, mechanism=MECHANISM)
    if "(all vs none)" in f.claim:
        return replace(f, paper_note="the paper measured VGG-16 (−0.83) and ResNet-44 (−0.51) on CIFAR-10, not this "
                       "architecture", mechanism=MECHANISM)
    return replace(f, paper_note="the paper: the harm grows with the number of BN layers (no per-layer figure)",
                   mechanism=MECHANISM)


def k_label(n_norm: int, total: int) -> str:
    if n_norm == 0:
        return "none"
    if n_norm >= total:
        return "all"
    return f"first {n_norm}"


def plan(grid: Grid, archs=DEFAULT_ARCHS, ks=DEFAULT_KS, cache_dir=None, norm: str = "bn", name: str = NAME,
         title: str = TITLE) -> StudyPlan:
    """``ks``: numbers of BatchNorm places (0 = none, ``None`` = all)."""
    if not archs:
        raise ValueError(f"{name} study: give at least one architecture")
    tasks, rows = [], []
    for arch in archs:
        fam, depth = _family(arch, None)
        total = norm_places(arch)
        seen = set()
        for k in ks:
            kk = total if k is None else int(k)
            if kk < 0:
                raise ValueError(f"k must be >= 0 or None (all), got {k!r}")
            kk = min(kk, total)
            if kk in seen:
                continue
            seen.add(kk)
            for seed in grid.seeds:
                t, row = model_cells(name, grid, arch, norm=norm if kk > 0 else "none",
                                     norm_layers=(None if kk in (0, total) else kk), seed=seed, cache_dir=cache_dir,
                                     factors={"k": k_label(kk, total), "places": total})
                tasks += t
                rows.append(row)
    return StudyPlan(name, title, tuple(tasks), pd.DataFrame(rows),
                     {"archs": list(archs), "ks": [("all" if k is None else k) for k in ks], "norm": norm})


def variant_frame(mf: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Rows of one noise placement; models without normalisation have nothing to fold,
    so their digital rows stand for both placements."""
    if variant == "digital":
        return mf[mf["variant"] == "digital"].reset_index(drop=True)
    folded = mf[mf["variant"] == "folded"]
    plain = mf[(mf["variant"] == "digital") & (mf["n_norm"] == 0)].assign(variant="folded")
    return pd.concat([folded, plain], ignore_index=True)


def paired_finding(study, source, frame, col, a, b, claim, sign, conf, by="norm_key", unit="normalised accuracy",
                   theory_col=None, theory_ok=True) -> Finding:
    x, y = seed_paired(frame, col, by, a, b)
    eff = paired_effect(x, y, f"{a} − {b}", conf, unit=unit)
    teff = None
    if theory_ok and theory_col is not None:
        tx, ty = seed_paired(frame, theory_col, by, a, b)
        if np.isfinite(tx).all() and np.isfinite(ty).all():
            teff = paired_effect(tx, ty, f"{a} − {b} (predicted)", conf, unit=unit)
    return Finding(study, claim, source, "direction", eff, expected_sign=sign, theory_effect=teff)


def _ols(frame, formula, term, unit=""):
    try:
        eff, _ = ols_effect(frame, formula, term, unit=unit)
        return eff
    except Exception as e:  # noqa: BLE001 - too few rows: no test
        nan = float("nan")
        return Effect(term, nan, nan, nan, nan, int(len(frame)), f"OLS {formula} (not estimable: {e})")


def mechanism_tables(mf: pd.DataFrame, group: str, reference, others, conf: float, alpha: float):
    """Side-by-side mechanisms: per group the mean over seeds with intervals; paired
    differences (log scale) of each other level against ``reference``; association of
    each mechanism with robustness across models. Holm within each table."""
    d = variant_frame(mf, "digital")
    cols = [c for c in MECHANISMS if c in d.columns]
    side = seed_summary(d, ["arch", group], cols + ["robustness"], conf)
    rows = []
    for arch in d["arch"].unique():
        da = d[d["arch"] == arch]
        for lvl in others:
            for c in cols:
                x, y = seed_paired(da.assign(v=np.log(da[c].astype(float))), "v", group, lvl, reference)
                ok = np.isfinite(x) & np.isfinite(y)
                if ok.sum() < 2:
                    if c.startswith("folding_inflation") and lvl != reference:
                        # the reference has no BatchNorm: test the inflation against 1 (log 0)
                        xs = np.log(da[da[group] == lvl][c].astype(float).to_numpy())
                        xs = xs[np.isfinite(xs)]
                        if xs.size >= 2:
                            e = paired_effect(xs, np.zeros_like(xs), "log inflation vs 1", conf, unit="log")
                            rows.append({"arch": arch, "level": lvl, "mechanism": c, "description": MECHANISMS[c],
                                         "log_ratio": e.estimate, "ci_low": e.ci_low, "ci_high": e.ci_high,
                                         "ratio": float(np.exp(e.estimate)), "p": e.p_value, "n": e.n,
                                         "test": "one-sample t of log inflation against 0 (no inflation)"})
                    continue
                e = paired_effect(x[ok], y[ok], f"{lvl} − {reference}", conf, unit="log")
                rows.append({"arch": arch, "level": lvl, "mechanism": c, "description": MECHANISMS[c],
                             "log_ratio": e.estimate, "ci_low": e.ci_low, "ci_high": e.ci_high,
                             "ratio": float(np.exp(e.estimate)), "p": e.p_value, "n": e.n,
                             "test": f"paired t across seeds of log({lvl}) − log({reference})"})
    paired = pd.DataFrame(rows)
    if not paired.empty:
        paired["p_holm"] = holm(paired["p"].to_numpy(float), alpha)[0]
    assoc = []
    for c in cols:
        if c.startswith("folding_inflation"):
            continue
        dd = d.assign(logm=np.log(d[c].astype(float)))
        dd = dd[np.isfinite(dd["logm"])]
        terms = " + C(arch)" if dd["arch"].nunique() > 1 else ""
        terms += " + C(seed)" if dd["seed"].nunique() > 1 else ""
        e = _ols(dd, f"robustness ~ logm{terms}", "logm", unit="per unit log")
        assoc.append({"mechanism": c, "description": MECHANISMS[c], "slope": e.estimate, "ci_low": e.ci_low,
                      "ci_high": e.ci_high, "p": e.p_value, "n": e.n, "test": e.method})
    assoc = pd.DataFrame(assoc)
    if not assoc.empty:
        assoc["p_holm"] = holm(assoc["p"].to_numpy(float), alpha)[0]
    return side, paired, assoc


def analyse(p: StudyPlan, results: dict, grid: Grid) -> StudyResult:
    alpha, conf = grid.alpha, grid.confidence
    mf = model_frame(p, results, grid)
    mf["norm_key"] = mf["k"]
    curves = curve_frame(p, results, grid)
    comp = compare_frame(p, results, grid)
    theory_ok = mf["pred_robustness"].notna().all()
    findings = []
    for arch in mf["arch"].unique():
        for variant, where in (("digital", "BatchNorm digital"), ("folded", "BatchNorm folded into the weights")):
            d = variant_frame(mf[mf["arch"] == arch], variant)
            if {"all", "none"} <= set(d["k"]):
                findings.append(paired_finding(
                    NAME, SOURCE, d, "robustness", "all", "none",
                    f"{arch}, noise with {where}: BatchNorm lowers robustness (all vs none)", -1, conf,
                    by="k", theory_col="pred_robustness", theory_ok=theory_ok))
            if d["n_norm"].nunique() >= 3:
                formula = "robustness ~ n_norm" + (" + C(seed)" if d["seed"].nunique() > 1 else "")
                eff = _ols(d, formula, "n_norm", unit="per BatchNorm layer")
                teff = _ols(d, formula.replace("robustness", "pred_robustness", 1), "n_norm",
                            unit="per BatchNorm layer") if theory_ok else None
                findings.append(Finding(NAME, f"{arch}, noise with {where}: the harm grows with the number of "
                                        "BatchNorm layers", SOURCE, "direction", eff, expected_sign=-1,
                                        theory_effect=teff))
    findings = finalise_findings([_with_paper(f) for f in findings], alpha)

    side, paired, assoc = mechanism_tables(mf, "k", "none", ["all"], conf, alpha)
    summ = pd.concat([seed_summary(variant_frame(mf, v).assign(variant=v), ["arch", "k", "variant"],
                                   ["clean_accuracy", "auc", "robustness", "pred_robustness", "eta10"], conf)
                      for v in ("digital", "folded")], ignore_index=True)
    comp_cells, validation = validation_tables(comp, alpha, conf)
    order = {"none": 0, "all": 10_000}
    summ["_o"] = summ["k"].map(lambda k: order.get(k, int(str(k).split()[-1]) if str(k).startswith("first") else 0))
    summ = summ.sort_values(["arch", "variant", "_o"]).drop(columns="_o").reset_index(drop=True)
    curves_fig = curves_figure_frame(
        pd.concat([variant_frame(curves, "digital"), variant_frame(curves, "folded")], ignore_index=True)
        .sort_values(["n_norm"], kind="stable"),
        lambda r: f"BN {r['k']}", conf, panel=lambda r: f"{r['arch']}, BN {r['variant']}")
    return norm_study_result(
        NAME, TITLE, p, results, grid, "k", mf, summ, side, paired, assoc, curves, curves_fig, comp, comp_cells,
        validation, findings,
        curves_caption="Accuracy vs η with BatchNorm in none / the first k / all places, noise on unfolded (BN "
                       "digital) and on folded weights; solid: Monte-Carlo mean over seeds with band, "
                       + THEORY_LINES + ".",
        bars_caption="Normalised accuracy (noisy/clean) averaged over η > 0, per number of BatchNorm layers, mean "
                     "over seeds with interval.",
        mechanisms_caption="Candidate mechanisms side by side (mean over seeds with interval).")


def norm_study_result(name, title, p, results, grid, key: str, mf, summ, side, paired, assoc, curves, curves_fig,
                      comp, comp_cells, validation, findings, *, curves_caption: str, bars_caption: str,
                      mechanisms_caption: str) -> StudyResult:
    """The figures, tables and notes of a study of normalisation layers (this one and
    ``norm_type``), whose models differ in the column ``key`` (``k``, ``norm_type``)."""
    bars = summ.assign(group=summ[key], value=summ["robustness"], ci_low=summ["robustness_ci_low"],
                       ci_high=summ["robustness_ci_high"], panel=summ["arch"] + ", BN " + summ["variant"])
    mech_fig = []
    for c in MECHANISMS:
        if c in side.columns:
            mech_fig.append(side.assign(group=side["arch"] + " " + side[key], value=side[c],
                                        ci_low=side[f"{c}_ci_low"], ci_high=side[f"{c}_ci_high"], panel=c)
                            [["panel", "group", "value", "ci_low", "ci_high"]])
    cols = ["panel", "group", "value", "ci_low", "ci_high"]
    figs = [
        Figure(f"{name}_curves", curves_caption, "curves", curves_fig, {"ylabel": "accuracy"}),
        Figure(f"{name}_robustness", bars_caption, "bars", bars[cols], {"ylabel": "normalised accuracy"}),
        Figure(f"{name}_mechanisms", mechanisms_caption, "bars",
               pd.concat(mech_fig, ignore_index=True) if mech_fig else pd.DataFrame(columns=cols), {}),
        Figure(f"{name}_calibration", "Predicted vs Monte-Carlo accuracy, every model, placement and η.",
               "calibration", calibration_figure_frame(comp, "accuracy", lambda r: f"BN {r['variant']}"), {}),
    ]
    tables = {f"{name}_models": mf, f"{name}_summary": summ, f"{name}_mechanisms": side,
              f"{name}_mechanism_tests": paired, f"{name}_mechanism_association": assoc,
              f"{name}_layers": layer_gain_frame(p, results, grid),
              f"{name}_curves": curves, f"{name}_compare": comp_cells, f"{name}_validation": validation,
              f"{name}_training": excluded_frame(p, results, grid)}
    return StudyResult(name, title, dict(p.params, **grid.to_dict()), tables, tuple(findings),
                       tuple(_theory_notes(mf) + diverged_notes(p, results, grid)), figures=tuple(figs))
