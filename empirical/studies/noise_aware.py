"""Study 5: standard against noise-aware (hardware-aware) training.

Question (an engineer's, not a source paper's): does training with a fresh draw of the
weight noise at every mini-batch (:func:`noiseprop.empirical.train.train` with
``noise=``, the weight modifier of aihwkit's hardware-aware training) make a network
more robust to that noise at inference, at equal clean accuracy, and does the theory
explain the gain?

Protocol: per architecture and training seed, the standard model (the same cells as
the architecture study: shared, trained once) and the same configuration trained with
relative weight noise ``η_train`` on the Conv/Linear weights. Both are measured exactly
as in the other studies (Monte-Carlo curves over η with common random numbers, the
theory's curve, ``tr(Σ_ε H)``), plus the per-layer sensitivity
(:func:`noiseprop.theory.sensitivity`) at ``η_train`` on the test inputs.

Tests, per architecture (seed as the unit, paired):
- robustness (normalised accuracy averaged over η > 0) noise-aware − standard (> 0);
- clean accuracy: equivalence within ±1 point (TOST), "at equal clean accuracy";
- theory: ``tr(Σ_ε H)`` (unit level, training inputs) lower after noise-aware training
  (log ratio < 0), and the predicted robustness gain beside the measured one.
The per-layer shares of the loss increase before and after are tabulated and drawn.

Cost, measured at MLP and ResNet-20 with 3 seeds (the default grid now has 4, a third
more): the standard models are shared with the architecture study; the new work is 6
noise-aware trainings (1.0–1.5× a standard training each: one extra weight copy and draw
per step), their Monte-Carlo curves and 12 sensitivity passes (one Jacobian pass each);
18 min from an empty cache (12 trainings), one worker, on a shared 2-core machine.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from noiseprop.theory import RelativeGaussian, sensitivity

from ..cells import config_key
from ..executor import Task
from ..stats import paired_effect
from .architecture import _theory_notes, default_norm
from .batchnorm import paired_finding, variant_frame
from .common import (CELL_VERSION, Finding, Grid, StudyPlan, StudyResult, _train, calibration_figure_frame,
                     compare_frame, curve_frame, curves_figure_frame, diverged_notes, finalise_findings, load_data,
                     model_cells, model_frame, seed_paired, seed_summary, validation_tables)
from .figures import Figure

NAME = "noise_aware"
TITLE = "Study 5: noise-aware training against standard training"
SOURCE = "hardware-aware training (aihwkit weight modifier; Joshi et al. 2020, Nat. Commun. 11:2473)"
DEFAULT_ARCHS = ("mlp", "resnet20")
DEFAULT_TRAIN_ETA = 0.3
CLEAN_MARGIN = 0.01
LABELS = {False: "standard", True: "noise-aware"}


def sensitivity_cell(model: dict, train: dict, dataset: str, data_dir, seed: int, cache_dir, eta: float,
                     n_inputs: int, n_train=None, deps=None) -> dict:
    """Per-layer sensitivity (:func:`noiseprop.theory.sensitivity`) of one trained model at
    relative noise ``eta`` on the first ``n_inputs`` test inputs."""
    if deps and any(isinstance(d, dict) and d.get("diverged") for d in deps.values()):
        return {"diverged": True}
    res, data = _train(model, train, dataset, data_dir, seed, cache_dir, n_train)
    n = min(int(n_inputs), data.n_test)
    s = sensitivity(res.model.eval(), data.x_test[:n], data.y_test[:n], RelativeGaussian(float(eta)))
    return {"layers": list(s.layers), "share_logit_var": list(s.share_logit_var), "share_loss": list(s.share_loss),
            "loss_increase": list(s.loss_increase), "accuracy_alone": list(s.accuracy_alone),
            "params": list(s.params), "accuracy": s.accuracy, "clean_accuracy": s.clean_accuracy,
            "loss_increase_total": s.loss_increase_total, "seconds": s.seconds}


def plan(grid: Grid, archs=DEFAULT_ARCHS, train_eta: float = DEFAULT_TRAIN_ETA, cache_dir=None) -> StudyPlan:
    """The cells: per architecture and seed, a standard and a noise-aware model (train,
    measure) and the per-layer sensitivity of each."""
    if not archs:
        raise ValueError("noise_aware study: give at least one architecture")
    if isinstance(train_eta, bool) or not isinstance(train_eta, (int, float)) or not 0 < float(train_eta) <= 5:
        raise ValueError(f"train_eta must be a relative noise level in (0, 5], got {train_eta!r}")
    train_eta = float(train_eta)
    data = load_data(grid.dataset, grid.data_dir, grid.n_train)
    n_inputs = int(data.n_test if grid.n_test is None else min(grid.n_test, data.n_test))
    tasks, rows = [], []
    for arch in archs:
        norm = default_norm(arch)
        for aware in (False, True):
            over = {"noise": f"relative:{train_eta:g}"} if aware else None
            for seed in grid.seeds:
                t, row = model_cells(NAME, grid, arch, norm=norm, seed=seed, cache_dir=cache_dir,
                                     train_overrides=over, factors={"training": LABELS[aware]})
                ttask = t[0]
                sconf = dict(ttask.config, kind="sensitivity", eta=train_eta, n_inputs=n_inputs,
                             version=CELL_VERSION)
                skey = config_key(sconf)
                skw = {k: ttask.kwargs[k] for k in ("model", "train", "dataset", "data_dir", "seed", "cache_dir",
                                                    "n_train")}
                stask = Task(skey, sensitivity_cell, dict(skw, eta=train_eta, n_inputs=n_inputs), sconf,
                             deps=(ttask.key,), label=f"sensitivity {ttask.label[6:]}", group=NAME)
                tasks += t + [stask]
                row["sens_key"] = skey
                rows.append(row)
    return StudyPlan(NAME, TITLE, tuple(tasks), pd.DataFrame(rows), {"archs": list(archs), "train_eta": train_eta})


def layer_frame(p: StudyPlan, results: dict) -> pd.DataFrame:
    """One row per (model, noisy layer): the per-layer sensitivity."""
    rows = []
    for _, r in p.index.iterrows():
        s = results.get(r["sens_key"], {})
        if not s or s.get("diverged"):
            continue
        for i, layer in enumerate(s["layers"]):
            rows.append({"arch": r["arch"], "training": r["training"], "seed": int(r["seed"]), "layer": layer,
                         "position": i, "share_loss": s["share_loss"][i], "share_logit_var": s["share_logit_var"][i],
                         "loss_increase": s["loss_increase"][i], "accuracy_alone": s["accuracy_alone"][i],
                         "params": s["params"][i]})
    return pd.DataFrame(rows)


def analyse(p: StudyPlan, results: dict, grid: Grid) -> StudyResult:
    alpha, conf = grid.alpha, grid.confidence
    mf = model_frame(p, results, grid)
    sens_tot = {}
    for _, r in p.index.iterrows():
        s = results.get(r["sens_key"], {})
        if s and not s.get("diverged"):
            sens_tot[r["sens_key"]] = s["loss_increase_total"]
    d = variant_frame(mf, "digital").copy()
    d["pred_loss_increase_eta_train"] = [sens_tot.get(k, np.nan) for k in d["sens_key"]] if len(d) else []
    d["log_trace"] = np.log(d["trace_digital"].astype(float))
    theory_ok = d["pred_robustness"].notna().all() if len(d) else False
    findings = []
    for arch in d["arch"].unique():
        da = d[d["arch"] == arch]
        findings.append(paired_finding(
            NAME, SOURCE, da, "robustness", "noise-aware", "standard",
            f"{arch}: noise-aware training (relative η={p.params['train_eta']:g}) is more robust to weight noise than "
            "standard training", +1, conf, by="training", theory_col="pred_robustness", theory_ok=theory_ok))
        x, y = seed_paired(da, "clean_accuracy", "training", "noise-aware", "standard")
        eff = paired_effect(x, y, "noise-aware − standard clean accuracy", conf, unit="accuracy")
        findings.append(Finding(NAME, f"{arch}: equal clean accuracy (within ±{CLEAN_MARGIN * 100:g} points)", SOURCE,
                                "equivalence", eff, margin=CLEAN_MARGIN))
        x, y = seed_paired(da, "log_trace", "training", "noise-aware", "standard")
        eff = paired_effect(x, y, "log tr(Σ_ε H) noise-aware − standard", conf, unit="log ratio")
        findings.append(Finding(NAME, f"{arch}: the theory's mechanism: noise-aware training lowers tr(Σ_ε H) "
                                "(a flatter minimum in the noise's metric)", SOURCE, "direction", eff,
                                expected_sign=-1))
    findings = finalise_findings(findings, alpha)
    summ = seed_summary(d, ["arch", "training"], ["clean_accuracy", "robustness", "pred_robustness", "auc", "eta10",
                                                  "trace_digital", "pred_loss_increase_eta_train"], conf)
    lf = layer_frame(p, results)
    if len(lf):
        lsum = (lf.groupby(["arch", "training", "position", "layer"], as_index=False)
                .agg(share_loss=("share_loss", "mean"), share_logit_var=("share_logit_var", "mean"),
                     loss_increase=("loss_increase", "mean"), accuracy_alone=("accuracy_alone", "mean"),
                     params=("params", "first"), seeds=("seed", "nunique")))
    else:
        lsum = pd.DataFrame(columns=["arch", "training", "position", "layer", "share_loss", "share_logit_var",
                                     "loss_increase", "accuracy_alone", "params", "seeds"])
    curves = curve_frame(p, results, grid)
    comp = compare_frame(p, results)
    comp_cells, validation = validation_tables(comp, alpha, conf)
    curves_fig = curves_figure_frame(variant_frame(curves, "digital"), lambda r: str(r["training"]), conf,
                                     panel=lambda r: str(r["arch"]))
    bars = summ.assign(group=summ["training"], value=summ["robustness"], ci_low=summ["robustness_ci_low"],
                       ci_high=summ["robustness_ci_high"], panel=summ["arch"])
    share_bars = (lsum.sort_values(["arch", "training", "position"], ascending=[True, False, True])
                  .assign(panel=lambda f: f["arch"] + ", " + f["training"], group=lambda f: f["layer"],
                          value=lambda f: 100 * f["share_loss"], ci_low=np.nan, ci_high=np.nan))
    figs = [
        Figure("noise_aware_curves", "Accuracy vs η, standard and noise-aware training (noise on the unfolded "
               "weights); solid: Monte-Carlo mean over seeds with band, dashed: theory.", "curves", curves_fig,
               {"ylabel": "accuracy"}),
        Figure("noise_aware_robustness", "Normalised accuracy averaged over η > 0, standard vs noise-aware.", "bars",
               bars[["panel", "group", "value", "ci_low", "ci_high"]], {"ylabel": "normalised accuracy"}),
        Figure("noise_aware_layer_shares", "Per-layer share (%) of the first-order loss increase at η_train, "
               "standard and noise-aware training side by side (mean over seeds), layers in network order.", "bars",
               share_bars[["panel", "group", "value", "ci_low", "ci_high"]], {"ylabel": "% of ΔL"}),
        Figure("noise_aware_calibration", "Predicted vs Monte-Carlo accuracy, every model and η.", "calibration",
               calibration_figure_frame(comp, "accuracy", lambda r: str(r["training"])), {}),
    ]
    tables = {"noise_aware_models": d, "noise_aware_summary": summ, "noise_aware_layers": lf,
              "noise_aware_layer_summary": lsum, "noise_aware_curves": curves, "noise_aware_compare": comp_cells,
              "noise_aware_validation": validation}
    notes = _theory_notes(d) + diverged_notes(p, results)
    return StudyResult(NAME, TITLE, dict(p.params, **grid.to_dict()), tables, tuple(findings), tuple(notes),
                       figures=tuple(figs))
