"""Tables of a study from its cells: per model, per curve point, per comparison;
the data of the figures."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from ..stats import mean_ci
from .grid import Grid
from .study_cells import StudyPlan
from .theory_helpers import first_order_valid

__all__ = ["eta_drop", "curve_metrics", "model_frame", "layer_gain_frame", "diverged_notes", "curve_frame",
           "compare_frame", "curves_figure_frame", "calibration_figure_frame", "below_floor", "excluded_frame"]


def eta_drop(etas, acc, clean, drop: float = 0.10) -> float:
    """The η at which the accuracy curve first falls ``drop`` below ``clean`` (linear
    interpolation between grid levels); ``inf`` when it never does on the grid."""
    etas = np.asarray(etas, float)
    acc = np.asarray(acc, float)
    target = clean - drop
    below = np.nonzero(acc <= target)[0]
    if below.size == 0:
        return float("inf")
    j = int(below[0])
    if j == 0:
        return float(etas[0])
    e0, e1, a0, a1 = etas[j - 1], etas[j], acc[j - 1], acc[j]
    return float(e0 + (a0 - target) * (e1 - e0) / (a0 - a1)) if a0 != a1 else float(e1)


def curve_metrics(etas, acc, clean) -> dict:
    """``auc``: the area under accuracy-vs-η divided by the η range (the mean accuracy
    over the range, trapezoid rule); ``robustness``: the normalised accuracy
    ``acc(η)/clean`` averaged over the noisy levels (η > 0), the measure of the BatchNorm
    paper (arXiv 2205.07372); ``eta10``: the η at which accuracy falls 10 points."""
    etas = np.asarray(etas, float)
    acc = np.asarray(acc, float)
    auc = float(np.trapezoid(acc, etas) / (etas[-1] - etas[0]))
    noisy = etas > 0
    rob = float(np.mean(acc[noisy] / clean)) if clean > 0 else float("nan")
    return {"auc": auc, "robustness": rob, "eta10": eta_drop(etas, acc, clean)}


def below_floor(results: dict, row, grid: Grid | None) -> str:
    """Why the model of index row ``row`` is excluded from comparisons ("" when it
    is not): its training diverged, or its clean test accuracy is below the grid's
    floor ``min_clean_accuracy``."""
    tr = results[row["train_key"]]
    if isinstance(tr, dict) and tr.get("diverged"):
        return f"training diverged ({tr['diverged']})"
    if grid is not None and grid.min_clean_accuracy > 0 and float(tr["test_accuracy"]) < grid.min_clean_accuracy:
        return (f"clean test accuracy {float(tr['test_accuracy']):.3f} is below the floor "
                f"{grid.min_clean_accuracy:.2f} (a model that did not learn measures training failure, not "
                "noise robustness)")
    return ""


def model_frame(plan: StudyPlan, results: dict, grid: Grid) -> pd.DataFrame:
    """One row per (model, noise placement): factors, clean accuracy, observed and
    predicted curve metrics, mechanisms."""
    rows = []
    for _, r in plan.index.iterrows():
        ev = results[r["eval_key"]]
        tr = results[r["train_key"]]
        if ev.get("diverged") or below_floor(results, r, grid):
            continue  # listed by diverged_notes()
        mech = ev.get("mechanisms", {})
        for variant, v in ev["variants"].items():
            acc = np.asarray(v["accuracies"]).mean(axis=1)
            loss = np.asarray(v["losses"]).mean(axis=1)
            clean = float(v["clean_accuracy"])
            noisy = np.asarray(grid.etas) > 0
            m = curve_metrics(grid.etas, acc, clean)
            row = {k: r[k] for k in plan.index.columns if k not in ("train_key", "eval_key")}
            row.update(variant=variant, clean_accuracy=clean, **m, clean_loss=float(v["clean_loss"]),
                       noise_loss=float(np.mean(loss[noisy] - float(v["clean_loss"]))),
                       train_test_accuracy=tr["test_accuracy"], n_params=tr["n_params"])
            if "pred_accuracy" in v:
                pm = curve_metrics(grid.etas, np.asarray(v["pred_accuracy"]), clean)
                row.update({f"pred_{k}": val for k, val in pm.items()})
                row["pred_noise_loss"] = float(np.mean(np.asarray(v["pred_loss_increase"])[noisy]))
            else:
                row.update(pred_auc=np.nan, pred_robustness=np.nan, pred_eta10=np.nan, pred_noise_loss=np.nan)
            row["theory_error"] = v.get("theory_error", "")
            row["theory_method"] = v.get("theory_method", "")
            for k in ("trace_digital", "trace_folded", "top_eigenvalue"):
                row[k] = mech.get(k, np.nan)
            if not ev.get("has_norm", True):  # nothing to fold: the folded network is the network
                row["trace_folded"] = mech.get("trace_digital", np.nan)
            ff = mech.get("folding_factors") or {}
            geo = lambda k: float(np.exp(np.mean(np.log([d[k] for d in ff.values()])))) if ff else np.nan  # noqa: E731
            row["folding_inflation"] = geo("inflation")
            row["folding_inflation_lognormal"] = geo("lognormal")
            lg = mech.get("layer_gains") or {}
            row["layer_gain_total"] = float(sum(lg.values())) if lg else np.nan
            row["mechanism_error"] = mech.get("error", "")
            rows.append(row)
    return pd.DataFrame(rows)


def layer_gain_frame(plan: StudyPlan, results: dict, grid: Grid | None = None) -> pd.DataFrame:
    """Per model and noisy layer: the per-layer gain (:func:`layer_gains`) and, for
    layers followed by a BatchNorm-like layer, the measured folding inflation, the
    spread of log BN gains and the log-normal closed form (:func:`folding_factors`)."""
    rows = []
    for _, r in plan.index.iterrows():
        ev = results[r["eval_key"]]
        if below_floor(results, r, grid):
            continue
        mech = ev.get("mechanisms", {}) if not ev.get("diverged") else {}
        gains = mech.get("layer_gains") or {}
        ff = mech.get("folding_factors") or {}
        for layer in list(dict.fromkeys(list(gains) + list(ff))):
            row = {k: r[k] for k in plan.index.columns if k not in ("train_key", "eval_key")}
            row.update(layer=layer, gain=gains.get(layer, np.nan))
            f = ff.get(layer, {})
            row.update(folding_inflation=f.get("inflation", np.nan), log_gain_std=f.get("log_gain_std", np.nan),
                       folding_inflation_lognormal=f.get("lognormal", np.nan))
            rows.append(row)
    return pd.DataFrame(rows)


def diverged_notes(plan: StudyPlan, results: dict, grid: Grid | None = None) -> list[str]:
    """One note per model left out of every table: its training diverged, or (given
    ``grid``) its clean accuracy is below the floor (:func:`below_floor`)."""
    out = []
    for _, r in plan.index.iterrows():
        why = below_floor(results, r, grid)
        if why:
            lvl = "".join(f" {k}={r[k]}" for k in ("k", "norm_name", "lr") if k in r.index)
            out.append(f"excluded: {r['arch']} norm={r['norm']}{lvl} seed={r['seed']}: {why}")
    return out


def excluded_frame(plan: StudyPlan, results: dict, grid: Grid | None = None) -> pd.DataFrame:
    """Per trained model: its factors, clean test accuracy and whether (and why) it is
    excluded from the comparisons."""
    rows = []
    for _, r in plan.index.iterrows():
        tr = results[r["train_key"]]
        row = {k: r[k] for k in plan.index.columns if k not in ("train_key", "eval_key")}
        row["clean_accuracy"] = float(tr["test_accuracy"]) if "test_accuracy" in tr else np.nan
        why = below_floor(results, r, grid)
        row.update(included=not why, reason=why)
        rows.append(row)
    return pd.DataFrame(rows)


def _variants(plan: StudyPlan, results: dict, grid: Grid | None):
    """``(plan row, noise placement, its evaluation)`` for every model at or above the
    grid's clean-accuracy floor."""
    for _, r in plan.index.iterrows():
        if below_floor(results, r, grid):
            continue
        for variant, v in results[r["eval_key"]]["variants"].items():
            yield r, variant, v


def curve_frame(plan: StudyPlan, results: dict, grid: Grid) -> pd.DataFrame:
    """One row per (model, noise placement, η): observed accuracy (mean over draws,
    t interval), loss, predicted accuracy and bounds."""
    rows = []
    for r, variant, v in _variants(plan, results, grid):
        A = np.asarray(v["accuracies"])
        Lo = np.asarray(v["losses"])
        for i, eta in enumerate(grid.etas):
            m, se, (lo, hi) = mean_ci(A[i], grid.confidence)
            row = {k: r[k] for k in plan.index.columns if k not in ("train_key", "eval_key")}
            row.update(variant=variant, eta=eta, accuracy=m, accuracy_se=se, accuracy_ci_low=lo,
                       accuracy_ci_high=hi, loss=float(Lo[i].mean()),
                       clean_accuracy=float(v["clean_accuracy"]))
            for k in ("pred_accuracy", "pred_accuracy_lower", "pred_accuracy_upper", "pred_loss_increase",
                      "pred_preact_frac", "pred_first_order_flagged", "pred_accuracy_linear"):
                row[k] = float(np.asarray(v[k])[i]) if k in v else np.nan
            row["theory_method"] = v.get("theory_method", "")
            rows.append(row)
    return pd.DataFrame(rows)


def compare_frame(plan: StudyPlan, results: dict, grid: Grid | None = None) -> pd.DataFrame:
    """One row per (model, noise placement, η, quantity) of prediction vs Monte-Carlo
    (models below the grid's clean-accuracy floor left out)."""
    rows = []
    for r, variant, v in _variants(plan, results, grid):
        for c in v.get("compare", []):
            row = {k: r[k] for k in plan.index.columns if k not in ("train_key",)}
            row.update(variant=variant, **c)
            rows.append(row)
    return pd.DataFrame(rows)


def curves_figure_frame(curves: pd.DataFrame, group: Callable[[pd.Series], str], confidence: float = 0.95,
                        panel: Callable[[pd.Series], str] | None = None) -> pd.DataFrame:
    """The data of a ``curves`` figure: per group and η, the mean over seeds of each
    model's Monte-Carlo accuracy with a t interval across seeds (a single seed: its
    Monte-Carlo interval), and the mean predicted accuracy."""
    c = curves.copy()
    c["group"] = c.apply(group, axis=1)
    c["panel"] = c.apply(panel, axis=1) if panel is not None else ""
    rows = []
    for (p, g, eta), d in c.groupby(["panel", "group", "eta"], sort=False):
        v = d["accuracy"].to_numpy(float)
        if v.size >= 2:
            m, _, (lo, hi) = mean_ci(v, confidence)
        else:
            m, lo, hi = float(v[0]), float(d["accuracy_ci_low"].iloc[0]), float(d["accuracy_ci_high"].iloc[0])
        pred = d["pred_accuracy"].to_numpy(float)
        methods = set(d["theory_method"]) if "theory_method" in d else {"linear"}
        lin = d["pred_accuracy_linear"].to_numpy(float) if "pred_accuracy_linear" in d else pred
        valid = (first_order_valid(d["pred_preact_frac"], d.get("pred_first_order_flagged"))
                 if "pred_preact_frac" in d else np.ones(len(d), bool))
        # the first order is drawn only where its validity diagnostic holds for every seed:
        # beside the moment curve, or alone (as the theory) where moments were not run
        lin_ok = float(np.mean(lin)) if (np.isfinite(lin).all() and valid.all()) else np.nan
        moments = "moments" in methods
        rows.append({"panel": p, "group": g, "eta": eta, "accuracy": m, "ci_low": lo, "ci_high": hi,
                     "predicted": (float(np.mean(pred)) if np.isfinite(pred).all() else np.nan) if moments else lin_ok,
                     "method": "/".join(sorted(methods)),
                     "predicted_first_order": lin_ok if moments else np.nan,
                     "n_seeds": int(d["seed"].nunique())})
    out = pd.DataFrame(rows)
    if panel is None:
        out = out.drop(columns="panel")
    return out


def calibration_figure_frame(comp: pd.DataFrame, quantity: str, group: Callable[[pd.Series], str]) -> pd.DataFrame:
    """The data of a ``calibration`` figure: one point per (model, noise placement, η)
    for ``quantity``."""
    d = comp[comp["quantity"] == quantity].copy() if "quantity" in comp.columns else comp.iloc[0:0]
    if d.empty:
        return pd.DataFrame(columns=["group", "predicted", "observed", "ci_low", "ci_high"])
    d["group"] = d.apply(group, axis=1)
    cols = [c for c in ("group", "arch", "norm", "n_norm", "seed", "variant", "eta", "predicted", "observed",
                        "ci_low", "ci_high", "tost_p") if c in d.columns]
    return d[cols].reset_index(drop=True)
