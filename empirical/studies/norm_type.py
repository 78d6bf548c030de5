"""Study 4: L2 vs L1 vs TopK BatchNorm (Fagbohungbe & Qian 2022, arXiv 2205.04886).

Source claims (abstract): "L1 and TopK BatchNorm type has excellent noise-resistant
property, and there is no sacrifice in performance due to the change in the BatchNorm
type from L2 to L1/TopK BatchNorm type".

Protocol: that of study 2 (:mod:`.batchnorm`) with the normalisation type as the
factor: each architecture without normalisation and with L2 (standard), L1 and TopK
BatchNorm in every place (docs/THEORY.md §4), several seeds, noise on unfolded weights
(BatchNorm digital) and on folded weights, common random numbers.

Tests, per architecture and noise placement (seed as a factor):
- L1 − L2 and TopK − L2 robustness, paired across seeds (claim: > 0);
- clean accuracy (whole test set) L1 vs L2 and TopK vs L2: equivalence within ±1 percentage point
  (TOST on the paired differences; claim: no sacrifice).
Mechanisms side by side as in study 2 (each type against L2).
"""
from __future__ import annotations

from dataclasses import replace as _replace

import pandas as pd

from ..models import norm_places
from ..stats import paired_effect
from .batchnorm import mechanism_tables, norm_study_result, paired_finding, variant_frame
from .common import (Finding, Grid, StudyPlan, StudyResult, compare_frame, curve_frame, curves_figure_frame,
                     finalise_findings, model_cells, model_frame, seed_paired, seed_summary, validation_tables)

MECHANISM = ("folding inflation from the spread of the normalisation gains (log-normal closed form 1/C + (1 − 1/C)e^{4τ²})")
PAPER_NOTE = "the paper reports directions only (abstract)"
NAME = "norm_type"
TITLE = "Study 4: L2 vs L1 vs TopK BatchNorm"
SOURCE = "Fagbohungbe & Qian 2022 (arXiv 2205.04886)"
DEFAULT_ARCHS = ("vgg", "resnet20")
DEFAULT_NORMS = ("none", "bn", "l1", "topk")
NORM_NAMES = {"none": "none", "bn": "L2", "l1": "L1", "topk": "TopK"}
CLEAN_MARGIN = 0.01


def plan(grid: Grid, archs=DEFAULT_ARCHS, norms=DEFAULT_NORMS, cache_dir=None) -> StudyPlan:
    if not archs:
        raise ValueError("norm_type study: give at least one architecture")
    bad = [n for n in norms if n not in NORM_NAMES]
    if bad or "bn" not in norms:
        raise ValueError(f"norms must include 'bn' (the L2 reference) and be among {list(NORM_NAMES)}; got {list(norms)}")
    tasks, rows = [], []
    for arch in archs:
        total = norm_places(arch)
        for norm in norms:
            for seed in grid.seeds:
                t, row = model_cells(NAME, grid, arch, norm=norm, seed=seed, cache_dir=cache_dir,
                                     factors={"norm_type": NORM_NAMES[norm], "places": total,
                                              "k": "none" if norm == "none" else "all"})
                tasks += t
                rows.append(row)
    return StudyPlan(NAME, TITLE, tuple(tasks), pd.DataFrame(rows), {"archs": list(archs), "norms": list(norms)})


def analyse(p: StudyPlan, results: dict, grid: Grid) -> StudyResult:
    alpha, conf = grid.alpha, grid.confidence
    mf = model_frame(p, results, grid)
    curves = curve_frame(p, results, grid)
    comp = compare_frame(p, results, grid)
    theory_ok = mf["pred_robustness"].notna().all()
    findings = []
    others = [n for n in ("L1", "TopK") if n in set(mf["norm_type"])]
    for arch in mf["arch"].unique():
        for variant, where in (("digital", "BatchNorm digital"), ("folded", "BatchNorm folded into the weights")):
            d = variant_frame(mf[mf["arch"] == arch], variant)
            for o in others:
                findings.append(paired_finding(
                    NAME, SOURCE, d, "robustness", o, "L2", f"{arch}, noise with {where}: {o} BatchNorm is more "
                    "robust than L2", +1, conf, by="norm_type", theory_col="pred_robustness", theory_ok=theory_ok))
        d = variant_frame(mf[mf["arch"] == arch], "digital")
        for o in others:
            # on the whole test set (the training cell's), not the study's n_test inputs
            x, y = seed_paired(d, "train_test_accuracy", "norm_type", o, "L2")
            eff = paired_effect(x, y, f"{o} − L2 clean accuracy", conf, unit="accuracy")
            findings.append(Finding(NAME, f"{arch}: no clean-accuracy sacrifice with {o} BatchNorm (within "
                                    f"±{CLEAN_MARGIN * 100:g} pp of L2)", SOURCE, "equivalence", eff,
                                    margin=CLEAN_MARGIN))
    findings = finalise_findings([_replace(f, mechanism=MECHANISM, paper_note=PAPER_NOTE) for f in findings], alpha)
    side, paired, assoc = mechanism_tables(mf, "norm_type", "L2", others, conf, alpha)
    summ = pd.concat([seed_summary(variant_frame(mf, v).assign(variant=v), ["arch", "norm_type", "variant"],
                                   ["clean_accuracy", "auc", "robustness", "pred_robustness", "eta10"], conf)
                      for v in ("digital", "folded")], ignore_index=True)
    comp_cells, validation = validation_tables(comp, alpha, conf)
    order = {n: i for i, n in enumerate(("none", "L2", "L1", "TopK"))}
    curves_fig = curves_figure_frame(
        pd.concat([variant_frame(curves, "digital"), variant_frame(curves, "folded")], ignore_index=True)
        .sort_values("norm_type", key=lambda c: c.map(order), kind="stable"),
        lambda r: str(r["norm_type"]), conf, panel=lambda r: f"{r['arch']}, BN {r['variant']}")
    return norm_study_result(
        NAME, TITLE, p, results, grid, "norm_type", mf, summ, side, paired, assoc, curves, curves_fig, comp,
        comp_cells, validation, findings,
        curves_caption="Accuracy vs η per normalisation type, noise on unfolded (BN digital) and on folded weights; "
                       "solid: Monte-Carlo mean over seeds with band, dashed: theory.",
        bars_caption="Normalised accuracy averaged over η > 0 per normalisation type.",
        mechanisms_caption="Candidate mechanisms side by side per normalisation type.")
